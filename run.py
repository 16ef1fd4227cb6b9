#!/usr/bin/env python
"""evomerge command line: `python run.py --config configs/quickstart.yaml` (see --help)."""
import sys

from evomerge.cli import main

if __name__ == "__main__":
    sys.exit(main())
