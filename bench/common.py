"""What the benchmark scripts share: the repository root, a quiet private-Ray environment for
`python run.py` subprocesses, and writing a results file."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}


def run_py(*args: str, check: bool = True, capture: bool = True) -> subprocess.CompletedProcess:
    """`python run.py ARGS` from the repository root, as a user runs it."""
    return subprocess.run([sys.executable, "run.py", *args], cwd=ROOT, env=ENV, check=check,
                          capture_output=capture, text=True)


def write_results(path: str | Path, data: dict, merge: bool = False) -> Path:
    """Write `data` as JSON to `path` (parents made); merge: update what the file already holds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if merge and path.exists():
        data = {**json.loads(path.read_text()), **data}
    path.write_text(json.dumps(data, indent=2) + "\n")
    return path
