"""Overlapping CMA-ES generations (strategy.overlap) against generational CMA-ES (overlap: 0), at equal
evaluations: the final best, its held-out score, worker utilization and evaluations/s.

    python bench/cmaes_overlap.py [--only simulated synthetic tinylm] [--seeds 0 1 2] [--sim-seeds 6]

- simulated: in process, no engine: the engine's free-running scheduling (8 workers, queue_depth 2: a
  candidate goes to the worker with the most free slots and waits behind what it holds) simulated with
  log-normal evaluation times (sigma 1), CMA-ES popsize 8 in 16 dimensions, 2,000 evaluations, on
  sphere, ellipsoid, Rosenbrock and the synthetic fitness: the best (as a distance to the optimum for the
  first three, minus the fitness for the last: lower is better) and the utilization, medians over
  --sim-seeds seeds.
- synthetic: the utilization case of bench/long_runs.py (synthetic space, dim 16, and fitness with
  log-normal evaluation times, median 50 ms, sigma 1; 8 workers; CMA-ES popsize 8, x0 center), 2,000
  evaluations per run.
- tinylm: configs/tinylm_ties_cmaes.yaml as it is (720 evaluations on 2 workers, popsize 12; needs
  zoo/tinylm), with `--set seed=S` and, for the generational rows, `--set strategy.overlap=0`.
Each variant runs with every seed (seeds in turn, both variants each); `overlap` is the strategy's
default (ceil(1.5 x parallelism / popsize)), read back from summary.json. Results:
bench/results/cmaes_overlap.json (per run, and the mean over seeds), updated after every run
("complete": false until the part has run every seed).
"""
from __future__ import annotations

import argparse
import heapq
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from common import ROOT, run_summary, write_results
from long_runs import config

sys.path.insert(0, str(ROOT))
VARIANTS = {"generational": {"overlap": 0}, "overlap": {}}  # {}: the default overlap
KEYS = ("worker_utilization", "evals_per_second", "search_seconds", "evaluations")


def one(*args: str) -> dict:
    s, holdout, wall = run_summary(*args)
    best = s["best"]
    accuracies = [v for k, v in holdout.items() if k.endswith("_accuracy")]
    if accuracies:
        holdout["mean_accuracy"] = statistics.fmean(accuracies)  # the tasks' held-out accuracies, unweighted
    return {"best_fitness": best["fitness"], "best_eval_id": best["eval_id"], "holdout": holdout,
            "overlap": s["strategy"].get("overlap"), "generations": s["strategy"].get("generations"),
            "wall_seconds": wall, **{k: s[k] for k in KEYS}}


def synthetic(tmp: Path, seeds: list[int]) -> dict:
    fit = {"delay_ms": 50, "delay_sigma": 1.0}
    engine = {"workers": 8, "cpus_per_worker": 0.25, "batch_size": 1, "queue_depth": 2}
    runs = {}
    for seed in seeds:
        for variant, extra in VARIANTS.items():
            name = f"synthetic_{variant}_s{seed}"
            cfg = config(tmp, name, {"name": "cmaes", "popsize": 8, "x0": "center", **extra}, fit, engine,
                         {"max_evals": 2000})
            cfg.write_text(cfg.read_text().replace("seed: 0\n", f"seed: {seed}\n"))
            runs[name] = one("--config", str(cfg), "--out", str(tmp / name))
            partial("synthetic", runs)
    return runs


def tinylm(tmp: Path, seeds: list[int]) -> dict:
    if not (ROOT / "zoo" / "tinylm" / "family.json").exists():
        raise SystemExit("tinylm: zoo/tinylm is not built (python run.py zoo tinylm --out zoo/tinylm)")
    runs = {}
    for seed in seeds:
        for variant, extra in VARIANTS.items():
            name = f"tinylm_{variant}_s{seed}"
            sets = [f"seed={seed}"] + [f"strategy.{k}={v}" for k, v in extra.items()]
            args = ["--config", str(ROOT / "configs" / "tinylm_ties_cmaes.yaml"), "--out", str(tmp / name)]
            for s in sets:
                args += ["--set", s]
            runs[name] = one(*args)
            partial("tinylm", runs)
    return runs


RESULTS = ROOT / "bench" / "results" / "cmaes_overlap.json"


def partial(part: str, runs: dict) -> None:
    """Print the run just done and keep what is done so far in the results file (a long bench can be cut)."""
    name = list(runs)[-1]
    print(name, runs[name], flush=True)
    write_results(RESULTS, {part: {"runs": runs, "mean": means(runs), "complete": False}}, merge=True)


def means(runs: dict) -> dict:
    """Per variant: the mean over seeds of each number (holdout keys too)."""
    out = {}
    for variant in VARIANTS:
        rows = [r for name, r in runs.items() if f"_{variant}_s" in name]
        if not rows:
            continue
        keys = ["best_fitness", "worker_utilization", "evals_per_second", "search_seconds"]
        m = {k: round(statistics.fmean(r[k] for r in rows), 6) for k in keys}
        for k in rows[0]["holdout"]:
            m[f"holdout_{k}"] = round(statistics.fmean(r["holdout"][k] for r in rows), 6)
        m["seeds"] = len(rows)
        m["overlap"] = rows[0]["overlap"]
        out[variant] = m
    return out


def simulate(fname: str, overlap: int | None, seed: int, evals: int = 2000, workers: int = 8, depth: int = 2,
             popsize: int = 8, dim: int = 16) -> tuple[float, float]:
    import numpy as np

    from evomerge.populations import Result, RunContext, SpaceInfo
    from evomerge.populations.cmaes import CMAES, CMAESConfig

    centres = np.random.default_rng(1234).uniform(-1, 1, (32, dim))
    scale = 10 ** (6 * np.arange(dim) / (dim - 1))
    f = {"sphere": lambda x: float(np.sum((x - 0.3) ** 2)),
         "ellipsoid": lambda x: float(np.sum(scale * (x - 0.3) ** 2)),
         "rosenbrock": lambda x: float(np.sum(100 * (3 * x[1:] - 9 * x[:-1] ** 2) ** 2 + (1 - 3 * x[:-1]) ** 2)),
         "synthetic": lambda x: -float(np.exp(-((centres - x) ** 2).sum(1) / dim).mean())}[fname]  # minimised
    bounded = fname == "synthetic"
    space = SpaceInfo(dim, tuple(np.zeros((2, dim), np.float32)), lower=np.full(dim, -1.0) if bounded else None,
                      upper=np.full(dim, 1.0) if bounded else None)
    st = CMAES(CMAESConfig(name="cmaes", popsize=popsize, sigma0=0.1 if bounded else 0.5, x0="zeros", overlap=overlap),
               space, seed, RunContext(parallelism=depth * workers))
    rng = np.random.default_rng(seed + 100)
    queues: list[list] = [[] for _ in range(workers)]  # per worker: (duration, candidate), the head running
    now = busy = 0.0
    asked = told = 0
    best = np.inf
    heap: list = []  # (finish time, worker)
    while told < evals:
        while asked < evals:
            w = min(range(workers), key=lambda w: len(queues[w]))
            if len(queues[w]) >= depth:
                break
            c = st.ask(1)
            if not c:
                break
            d = float(np.exp(rng.standard_normal()))
            busy += d
            asked += 1
            queues[w].append((d, c[0]))
            if len(queues[w]) == 1:
                heapq.heappush(heap, (now + d, w))
        now, w = heapq.heappop(heap)
        _, c = queues[w].pop(0)
        if queues[w]:
            heapq.heappush(heap, (now + queues[w][0][0], w))
        v = f(c.x.astype(np.float64))
        best = min(best, v)
        told += 1
        st.tell([Result(c, -v)])
    return best, busy / (now * workers)


def simulated(seeds: int) -> dict:
    import warnings

    out = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for fname in ("sphere", "ellipsoid", "rosenbrock", "synthetic"):
            for variant, extra in VARIANTS.items():
                r = [simulate(fname, extra.get("overlap"), s) for s in range(seeds)]
                out[f"{fname}_{variant}"] = {"best_median": float(statistics.median(b for b, _ in r)),
                                             "utilization": round(statistics.fmean(u for _, u in r), 3)}
                print(fname, variant, out[f"{fname}_{variant}"], flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", nargs="*", default=["simulated", "synthetic", "tinylm"])
    ap.add_argument("--seeds", nargs="*", type=int, default=[0, 1, 2])
    ap.add_argument("--sim-seeds", type=int, default=6, help="seeds of the simulated part")
    args = ap.parse_args()
    results = {"cpus": os.cpu_count(), "seeds": args.seeds}
    with tempfile.TemporaryDirectory(prefix="evomerge-cmaes-overlap-") as tmp:
        tmp = Path(tmp)
        for part in args.only:
            t = time.perf_counter()
            if part == "simulated":
                results[part] = {"cases": simulated(args.sim_seeds), "seeds": args.sim_seeds,
                                 "bench_seconds": round(time.perf_counter() - t, 1)}
                continue
            runs = {"synthetic": synthetic, "tinylm": tinylm}[part](tmp, args.seeds)
            results[part] = {"runs": runs, "mean": means(runs), "complete": True,
                             "bench_seconds": round(time.perf_counter() - t, 1)}
            print(part, json.dumps(results[part]["mean"], indent=1), flush=True)
    print(f"wrote {write_results(RESULTS, results, merge=True)}")


if __name__ == "__main__":
    main()
