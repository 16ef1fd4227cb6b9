"""Figure 4: NSGA-II over the three task accuracies against CMA-ES on their weighted sum, at equal evaluations:
the hypervolume of the Pareto front each run leaves in summary.json.

    python bench/pymoo_front.py [--seeds 0 1 2] [--quick]

The 3-task tiny-LM search (zoo/tinylm: a layer-wise TIES merge of the upper, sort and count experts, 42
coordinates, 64 search examples per task): configs/tinylm_ties_cmaes.yaml (CMA-ES, popsize 12, on the fitness,
the example-weighted mean of the task accuracies) and configs/tinylm_nsga2.yaml (pymoo's NSGA-II, population 24,
on the three accuracies as objectives), each with `--set seed=S`, 720 evaluations (the configs' budget), 2
workers. summary.json's pareto_front is the non-dominated set of every evaluation of the run over the fitness's
objectives, whichever strategy ran; its hypervolume (pymoo.indicators.hv, the accuracies maximised, reference
point 0: the volume of [0, 1]^3 the front dominates) is the figure, with the front's size, the best fitness
and the best's held-out mean accuracy. --quick: seed 0 only, 96 evaluations per run (a check that it works,
about a minute; not the figure). Results: bench/results/pymoo_front.json, updated after every run.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from common import ROOT, run_summary, write_results

sys.path.insert(0, str(ROOT))
CONFIGS = {"cmaes_weighted_sum": "tinylm_ties_cmaes.yaml", "nsga2": "tinylm_nsga2.yaml"}
RESULTS = ROOT / "bench" / "results" / "pymoo_front.json"


def hypervolume(points: list[list[float]]) -> float:
    """The volume of [0, 1]^k dominated by `points` (accuracies, higher is better), reference point 0."""
    import numpy as np
    from pymoo.indicators.hv import HV

    if not points:
        return 0.0
    return float(HV(ref_point=np.zeros(len(points[0])))(-np.asarray(points, np.float64)))


def one(variant: str, seed: int, out: Path, max_evals: int | None) -> dict:
    args = ["--config", str(ROOT / "configs" / CONFIGS[variant]), "--out", str(out), "--set", f"seed={seed}"]
    if max_evals is not None:
        args += ["--set", f"budget.max_evals={max_evals}"]
    s, holdout, wall = run_summary(*args)
    front = s["pareto_front"]
    names = front["objectives"]
    points = [[m["objectives"][k] for k in names] for m in front["members"]]
    holdout = {k: v for k, v in holdout.items() if k.endswith("_accuracy")}
    return {"hypervolume": round(hypervolume(points), 6), "front_size": len(points),
            "front_best_per_objective": {k: max(p[i] for p in points) for i, k in enumerate(names)},
            "best_fitness": s["best"]["fitness"],
            "best_holdout_mean_accuracy": round(statistics.fmean(holdout.values()), 6) if holdout else None,
            "evaluations": s["evaluations"], "failed": s["failed"], "worker_utilization": s["worker_utilization"],
            "search_seconds": s["search_seconds"], "wall_seconds": wall,
            "strategy": s["strategy"]}


def means(runs: dict) -> dict:
    out = {}
    for variant in CONFIGS:
        rows = [r for name, r in runs.items() if name.startswith(variant + "_s")]
        if not rows:
            continue
        hv = [r["hypervolume"] for r in rows]
        m = {"hypervolume_mean": round(statistics.fmean(hv), 6),
             "hypervolume_min": min(hv), "hypervolume_max": max(hv),
             "front_size_mean": round(statistics.fmean(r["front_size"] for r in rows), 2),
             "best_fitness_mean": round(statistics.fmean(r["best_fitness"] for r in rows), 6),
             "wall_seconds_mean": round(statistics.fmean(r["wall_seconds"] for r in rows), 1), "seeds": len(rows)}
        ho = [r["best_holdout_mean_accuracy"] for r in rows if r["best_holdout_mean_accuracy"] is not None]
        if ho:
            m["best_holdout_mean_accuracy_mean"] = round(statistics.fmean(ho), 6)
        out[variant] = m
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", nargs="*", type=int, default=[0, 1, 2])
    ap.add_argument("--quick", action="store_true", help="seed 0, 96 evaluations per run: a check, not the figure")
    args = ap.parse_args()
    if not (ROOT / "zoo" / "tinylm" / "family.json").exists():
        raise SystemExit("zoo/tinylm is not built (python run.py zoo tinylm --out zoo/tinylm)")
    seeds, max_evals = ([0], 96) if args.quick else (args.seeds, None)
    results = {"cpus": os.cpu_count(), "seeds": seeds, "quick": args.quick,
               "evaluations_per_run": max_evals or 720, "reference_point": 0.0, "complete": False}
    runs: dict = {}
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="evomerge-pymoo-front-") as tmp:
        for seed in seeds:
            for variant in CONFIGS:
                name = f"{variant}_s{seed}"
                runs[name] = one(variant, seed, Path(tmp) / name, max_evals)
                print(name, {k: v for k, v in runs[name].items() if k != "strategy"}, flush=True)
                write_results(RESULTS, {**results, "runs": runs, "mean": means(runs)})
    results.update(runs=runs, mean=means(runs), complete=True, bench_seconds=round(time.perf_counter() - t0, 1))
    print(json.dumps(results["mean"], indent=1))
    print(f"wrote {write_results(RESULTS, results)}")


if __name__ == "__main__":
    main()
