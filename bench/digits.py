"""Figures for the digits task: accuracy and time of each configs/digits_* search over seeds.

    python bench/digits.py                       # every figure of the foundation issue
    python bench/digits.py --only quickstart --seeds 0 1 2 --set engine.batch_size=32

Each run is the real command (`python run.py --config ...`) in a subprocess, timed from
outside; its summary.json gives search time, test accuracy and memory. Results are printed
as a table and written to bench/results/digits.json.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import ROOT, write_results

RUNS = {  # name -> (config, paper's test accuracy or None)
    "quickstart": ("configs/quickstart.yaml", 0.685),
    "m2n2_scratch": ("configs/digits_scratch_m2n2.yaml", 0.87),
    "cmaes_scratch": ("configs/digits_scratch_cmaes.yaml", None),
    "ga_scratch": ("configs/digits_ga.yaml", 0.68),
}


def run_once(config: str, seed: int, sets: list[str], out: Path) -> dict:
    cmd = [sys.executable, "run.py", "--config", config, "--out", str(out), "--no-progress",
           "--set", f"seed={seed}"]
    for s in sets:
        cmd += ["--set", s]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    s = json.loads((out / "summary.json").read_text())
    return {
        "seed": seed,
        "test_accuracy": s["best"]["holdout"]["test_accuracy"],
        "train_accuracy": s["best"]["fitness"],
        "search_seconds": s["search_seconds"],
        "command_seconds": round(wall, 2),
        "evaluations": s["evaluations"],
        "evals_per_second": s["evals_per_second"],
        "worker_utilization": s["worker_utilization"],
        "driver_peak_rss_mb": s["driver_peak_rss_mb"],
        "worker_peak_rss_mb": max(s["worker_peak_rss_mb"]),
    }


def spread(values: list[float]) -> str:
    m = statistics.mean(values)
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{m:.4f} ± {sd:.4f} [{min(values):.4f}, {max(values):.4f}]"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", nargs="*", choices=list(RUNS), default=list(RUNS))
    ap.add_argument("--seeds", nargs="*", type=int, default=[0, 1, 2])
    ap.add_argument("--set", action="append", default=[], help="extra config override for every run")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "digits.json"))
    args = ap.parse_args()

    report = {}
    with tempfile.TemporaryDirectory(prefix="evomerge-bench-") as tmp:
        for name in args.only:
            config, paper = RUNS[name]
            rows = [run_once(config, seed, args.set, Path(tmp) / f"{name}-{seed}") for seed in args.seeds]
            report[name] = {"config": config, "sets": args.set, "paper_test_accuracy": paper, "runs": rows}
            print(f"\n{name} ({config}{' ' + ' '.join(args.set) if args.set else ''}), seeds {args.seeds}")
            for key in ("test_accuracy", "search_seconds", "command_seconds", "evals_per_second",
                        "worker_utilization", "driver_peak_rss_mb", "worker_peak_rss_mb"):
                print(f"  {key:20s} {spread([r[key] for r in rows])}")
            if paper is not None:
                print(f"  paper test accuracy  {paper}")
            sys.stdout.flush()
    print(f"\nwritten {write_results(args.out, report)}")


if __name__ == "__main__":
    main()
