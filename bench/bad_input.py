"""Every case of the bad-input corpus (tests/bad_input_cases.py) as the real command in a subprocess:
how many are refused as they should be (exit code 2, one line `error: ...` naming the field or file,
no run directory, no Ray process started), and how long a refusal takes from the command to its line
(the median over the task-file defects is the issue's figure; target < 3 s).

    .venv/bin/python bench/bad_input.py [--only SUBSTRING] [--out bench/results/bad_input.json]

Ray not started: each command runs `run.py` through `runpy` in a fresh interpreter with an audit hook
that logs every process it spawns (a Ray start spawns gcs_server and the raylet); a spawn naming ray
fails the case. Cases run one at a time, so the timings are those of an otherwise idle command.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from bad_input_cases import CASES, Env, Shared, problems, snapshot  # noqa: E402

from common import ENV, write_results  # noqa: E402

# run.py as `python run.py ARGS` runs it, plus a hook logging each process spawned
WRAPPER = """
import os, sys
_log = os.environ["EVOMERGE_BAD_INPUT_SPAWNS"]
def _hook(event, args):
    if event in ("subprocess.Popen", "os.posix_spawn", "os.exec", "os.spawn", "os.fork"):
        with open(_log, "a") as f:
            f.write(event + " " + repr(args[:2])[:500] + "\\n")
sys.addaudithook(_hook)
sys.argv = ["run.py", *sys.argv[1:]]
import runpy
runpy.run_path("run.py", run_name="__main__")
"""


def run_case(case, shared: Shared, root: Path) -> dict:
    tmp = root / case.id
    tmp.mkdir(parents=True)
    env = Env(shared, tmp)
    argv = env.argv(case)
    before = snapshot(env.kept(case))
    spawns = tmp.parent / f"{case.id}.spawns"
    t = time.perf_counter()
    r = subprocess.run([sys.executable, "-c", WRAPPER, *argv], cwd=ROOT, capture_output=True, text=True,
                       timeout=600, env={**ENV, "EVOMERGE_BAD_INPUT_SPAWNS": str(spawns),
                                         "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"})
    seconds = time.perf_counter() - t
    bad = problems(case, env, r.returncode, r.stderr, before)
    spawned = spawns.read_text().splitlines() if spawns.exists() else []
    if any("ray" in line.lower() for line in spawned):
        bad.append(f"Ray was started: {spawned[0]}")
    return {"id": case.id, "group": case.group, "passed": not bad, "problems": bad, "seconds": round(seconds, 3),
            "returncode": r.returncode, "stderr": r.stderr.strip()[-400:]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", default=None, help="run the cases whose id contains this")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "bad_input.json"))
    args = ap.parse_args()
    cases = [c for c in CASES if args.only is None or args.only in c.id]
    root = Path(tempfile.mkdtemp(prefix="bad-input-"))
    rows, skipped = [], []
    try:
        shared = Shared(root / "shared")
        for c in cases:
            if any(importlib.util.find_spec(p) is None for p in c.needs):
                skipped.append(c.id)
                continue
            row = run_case(c, shared, root / "cases")
            rows.append(row)
            mark = "ok  " if row["passed"] else "FAIL"
            print(f"{mark} {row['seconds']:6.2f} s  {c.id}" + ("" if row["passed"] else f": {row['problems']}"),
                  flush=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)

    def median(pred) -> float | None:
        xs = [r["seconds"] for r in rows if pred(r)]
        return round(statistics.median(xs), 3) if xs else None

    task = lambda r: r["group"] == "task_file"  # noqa: E731
    result = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "cases_tried": len(rows), "cases_passed": sum(r["passed"] for r in rows), "skipped": skipped,
        "failed": [r["id"] for r in rows if not r["passed"]],
        "median_s_task_file": median(task),
        "median_s_task_file_by_fitness": {f: median(lambda r, f=f: task(r) and r["id"].startswith(f + "-"))
                                          for f in ("lm_tasks", "api", "lm_eval")},
        "median_s_config": median(lambda r: r["group"] == "config"),
        "max_s": max((r["seconds"] for r in rows), default=None),
        "cpu_count": os.cpu_count(),
        "cases": rows,
    }
    path = write_results(args.out, result)
    print(f"cases tried {result['cases_tried']}, passed {result['cases_passed']}"
          + (f", skipped {len(skipped)} (missing packages)" if skipped else ""))
    print(f"median seconds from the command to its one-line refusal: task-file defects "
          f"{result['median_s_task_file']} s (by fitness: {json.dumps(result['median_s_task_file_by_fitness'])}), "
          f"config defects {result['median_s_config']} s")
    print(f"wrote {path}")
    return 0 if result["cases_passed"] == result["cases_tried"] else 1


if __name__ == "__main__":
    sys.exit(main())
