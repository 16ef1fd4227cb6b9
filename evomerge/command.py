"""The command the user ran, for hints and usage lines (`python run.py`, `python -m evomerge` or `evomerge`)."""
from __future__ import annotations

import sys
from pathlib import Path


def prog(command: str | None = None) -> str:
    """The name the user typed: `python run.py`, `python -m evomerge` or the `evomerge` console script."""
    name = Path(sys.argv[0]).name
    base = {"run.py": "python run.py", "__main__.py": "python -m evomerge"}.get(name, "evomerge")
    return f"{base} {command}" if command else base
