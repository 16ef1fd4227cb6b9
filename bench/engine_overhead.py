"""Engine overhead on the digits fitness: evaluations/s with 1 and 2 Ray workers.

    python bench/engine_overhead.py [--evals 10000] [--batch-size 32] [--seeds 0 1]

Compares the engine's throughput (the quickstart M2N2 search, through `run.py`) with the
bare fitness in this process on one core (no Ray, no strategy): the difference is what
dispatching, serialising, telling and logging cost per evaluation.
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

import numpy as np
import torch

from common import ROOT, write_results  # noqa: E402

sys.path.insert(0, str(ROOT))

from evomerge.demos import digits  # noqa: E402


def bare_rate(batch_size: int, seconds: float = 5.0) -> float:
    torch.set_num_threads(1)
    train, _ = digits.load()
    scorer = digits.BatchScorer(train)
    batch = (np.random.default_rng(0).standard_normal((batch_size, digits.N_PARAMS)) * 0.05).astype(np.float32)
    scorer.correct(batch)
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        scorer.correct(batch)
        n += batch_size
    return n / (time.perf_counter() - t0)


def engine_run(workers: int, batch_size: int, evals: int, seed: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "run"
        cmd = [sys.executable, "run.py", "--config", "configs/quickstart.yaml", "--out", str(out), "--no-progress",
               "--set", f"engine.workers={workers}", "--set", f"engine.batch_size={batch_size}",
               "--set", f"budget.max_evals={evals}", "--set", f"seed={seed}"]
        subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True)
        return json.loads((out / "summary.json").read_text())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--evals", type=int, default=10_000)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--seeds", nargs="*", type=int, default=[0, 1])
    args = ap.parse_args()

    bare = bare_rate(args.batch_size)
    print(f"bare fitness, 1 core, batch {args.batch_size}: {bare:.0f} evals/s ({1e3 / bare:.3f} ms/eval)")
    report = {"bare_evals_per_second": bare, "engine": {}}
    for workers in (1, 2):
        runs = [engine_run(workers, args.batch_size, args.evals, s) for s in args.seeds]
        rate = statistics.mean(r["evals_per_second"] for r in runs)
        util = statistics.mean(r["worker_utilization"] for r in runs)
        drv = statistics.mean(r["driver_cpu_ms_per_eval"] for r in runs)
        ideal = workers * bare
        report["engine"][workers] = {"evals_per_second": rate, "runs": [r["evals_per_second"] for r in runs],
                                     "worker_utilization": util, "driver_cpu_ms_per_eval": drv}
        print(f"{workers} worker(s): {rate:.0f} evals/s {[round(r['evals_per_second']) for r in runs]}, "
              f"{100 * rate / ideal:.0f}% of {workers} x bare; utilization {util:.2f}; "
              f"driver CPU {drv:.3f} ms/eval; overhead {1e3 / rate - 1e3 / ideal:.3f} ms/eval of wall time")
    write_results(ROOT / "bench" / "results" / "engine_overhead.json", report)


if __name__ == "__main__":
    main()
