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


def run_summary(*args: str) -> tuple[dict, dict, float]:
    """`run.py` with `args` (an `--out DIR` among them; progress off), then (its summary.json, the best's numeric
    held-out metrics, the command's wall seconds); a failed run exits the bench naming the command."""
    import time

    out = Path(args[args.index("--out") + 1])
    t = time.perf_counter()
    r = run_py(*args, "--no-progress", check=False)
    if r.returncode != 0:
        raise SystemExit(f"run.py {' '.join(args)} failed:\n{r.stderr[-3000:]}")
    s = json.loads((out / "summary.json").read_text())
    holdout = {k: v for k, v in (s["best"].get("holdout") or {}).items() if isinstance(v, (int, float))}
    return s, holdout, round(time.perf_counter() - t, 1)
