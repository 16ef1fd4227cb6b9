"""`python -m evomerge ...`: the same command line as the `evomerge` console script (see --help)."""
import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
