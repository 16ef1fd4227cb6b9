"""Time from a fresh clone to the first finished default search, following only the README.

    python bench/fresh_clone.py [--repo .] [--no-pip-cache]

Clones the repository (its committed HEAD) into a new temporary directory and runs the README's
first command there, `make demo`, timing the clone, the set-up (.venv: torch, then this package)
and the search separately. `--no-pip-cache` (PIP_NO_CACHE_DIR=1) makes pip fetch every wheel from
the package index as a fresh machine would, instead of reusing this machine's pip cache.
Writes bench/results/fresh_clone.json.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repo", default=str(ROOT), help="repository to clone (default: this one)")
    ap.add_argument("--no-pip-cache", action="store_true", help="PIP_NO_CACHE_DIR=1: fetch every wheel")
    ap.add_argument("--keep", action="store_true", help="keep the clone")
    args = ap.parse_args()
    readme = (ROOT / "README.md").read_text().splitlines()
    first = next(line for line in readme if line.startswith("make demo"))
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("VIRTUAL_ENV", None)
    if args.no_pip_cache:
        env["PIP_NO_CACHE_DIR"] = "1"
    tmp = Path(tempfile.mkdtemp(prefix="evomerge-fresh-"))
    clone = tmp / "evomerge"
    try:
        t0 = time.perf_counter()
        subprocess.run(["git", "clone", "-q", args.repo, str(clone)], check=True)
        t_clone = time.perf_counter() - t0
        t1 = time.perf_counter()
        setup = subprocess.run(["make", ".venv/.installed"], cwd=clone, env=env, capture_output=True, text=True)
        t_setup = time.perf_counter() - t1
        if setup.returncode:
            raise SystemExit(f"set-up failed:\n{setup.stdout[-2000:]}\n{setup.stderr[-2000:]}")
        t2 = time.perf_counter()
        demo = subprocess.run(["make", "demo"], cwd=clone, env=env, capture_output=True, text=True)
        t_demo = time.perf_counter() - t2
        if demo.returncode:
            raise SystemExit(f"make demo failed:\n{demo.stdout[-2000:]}\n{demo.stderr[-2000:]}")
        runs = sorted((clone / "runs").iterdir())
        summary = json.loads((runs[-1] / "summary.json").read_text())
        result = {
            "command": f"git clone {args.repo} evomerge && cd evomerge && {first.split('#')[0].strip()}",
            "pip_cache": not args.no_pip_cache,
            "clone_s": round(t_clone, 1), "setup_s": round(t_setup, 1), "demo_s": round(t_demo, 1),
            "total_s": round(t_clone + t_setup + t_demo, 1),
            "evaluations": summary["evaluations"], "search_s": summary["search_seconds"],
            "best_fitness": summary["best"]["fitness"], "holdout": summary["best"]["holdout"],
            "demo_stdout_tail": [line for line in demo.stdout.splitlines()
                                 if re.match(r"(best|stopped|run dir)", line)],
        }
    finally:
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)
    print(json.dumps(result, indent=2))
    out = ROOT / "bench" / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / "fresh_clone.json").write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
