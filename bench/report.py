"""How long `python run.py report` takes on a 50,000-evaluation run.

    python bench/report.py [--run DIR] [--evals 50000] [--repeats 3]

Without --run, first runs the default search at --evals evaluations into a temporary directory
(`python run.py --config configs/quickstart.yaml --set budget.max_evals=50000`, about 1-2 minutes on
2 cores). Then times `python run.py report DIR --timings` end to end (process wall time) --repeats
times, with the seconds inside the report split into reading (evals.jsonl, strategy.jsonl, ...) and
plotting (every figure and report.md). Writes bench/results/report.json.
"""
from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import ENV, ROOT, run_py, write_results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", metavar="DIR", help="report this run directory (default: run the search first)")
    ap.add_argument("--evals", type=int, default=50_000, help="evaluations of the search run without --run")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()

    tmp = None
    if args.run:
        run = Path(args.run).resolve()
    else:
        tmp = Path(tempfile.mkdtemp(prefix="evomerge-bench-report-"))
        run = tmp / "run"
        t0 = time.perf_counter()
        run_py("--config", "configs/quickstart.yaml", "--set", f"budget.max_evals={args.evals}", "--out", str(run),
               "--no-progress")
        print(f"search: {args.evals} evaluations in {time.perf_counter() - t0:.0f} s -> {run}")
    try:
        n = sum(1 for _ in open(run / "evals.jsonl", "rb"))
        cmd = [sys.executable, "run.py", "report", str(run), "--timings"]
        walls, inside = [], []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            r = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, check=True)
            walls.append(time.perf_counter() - t0)
            inside.append(json.loads(r.stderr.strip().splitlines()[-1]))
            print(f"report: {walls[-1]:.2f} s wall (read {inside[-1]['read_s']:.2f} s, "
                  f"plot and write {inside[-1]['plot_s']:.2f} s)")
        pngs = sorted(p.name for p in (run / "report").glob("*.png"))
        result = {
            "command": " ".join(["python", "run.py", "report", "RUN_DIR"]),
            "evaluations": n,
            "strategy_lines": (sum(1 for _ in open(run / "strategy.jsonl", "rb"))
                               if (run / "strategy.jsonl").exists() else 0),
            "wall_s": [round(w, 3) for w in walls],
            "wall_s_median": round(statistics.median(walls), 3),
            "read_s_median": round(statistics.median(i["read_s"] for i in inside), 3),
            "plot_s_median": round(statistics.median(i["plot_s"] for i in inside), 3),
            "images": pngs,
            "report_bytes": sum(p.stat().st_size for p in (run / "report").iterdir()),
        }
        print(f"{n} evaluations: report in {result['wall_s_median']:.2f} s (median of {args.repeats}; read "
              f"{result['read_s_median']:.2f} s, plot {result['plot_s_median']:.2f} s); images: {', '.join(pngs)}")
        write_results(ROOT / "bench" / "results" / "report.json", result)
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
