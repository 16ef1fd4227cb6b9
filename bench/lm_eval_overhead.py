"""What scoring through lm-evaluation-harness costs: seconds per candidate of the `lm_eval` fitness
next to `lm_tasks` on the same tiny-LM tasks and examples.

    python run.py zoo tinylm --out zoo/tinylm        # once, about 4 minutes
    python bench/lm_eval_overhead.py [--zoo zoo/tinylm] [--candidates 24] [--kind choice generate]
                                     [--limit 64] [--threads 1]

Two in-process FitnessWorkers over the same hf_merge space (TIES, layer-wise, the three experts of
configs/tinylm_ties_cmaes.yaml), one scoring with lm_tasks (the task JSONL files), one with lm_eval
(the same files as lm-eval tasks, <zoo>/lm_eval_tasks, written here when the zoo predates them).
For each of `--candidates` random points, each worker merges the point into its resident model and
the fitness alone is timed (the merge is the same for both and not counted); which fitness goes
first alternates. The first candidate is a warm-up, not counted. Also checked: both give the same
per-example scores for every candidate. Reported: median and mean seconds per candidate, the
overhead of lm_eval (seconds and ratio), the time to import lm-eval (once per worker), to build
each fitness (lm_eval: its TaskManager and tasks) and one held-out scoring. Results go to bench/results/lm_eval.json.
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

from common import ROOT, write_results  # noqa: E402

sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

from evomerge.config import RunConfig  # noqa: E402
from evomerge.demos.tasks import write_lm_eval_tasks  # noqa: E402
from evomerge.engine.worker import FitnessWorker  # noqa: E402


def run_config(fam: dict, fitness: dict) -> RunConfig:
    return RunConfig.model_validate({
        "seed": 0,
        "space": {"name": "hf_merge", "method": "ties", "layer_granularity": 1,
                  "models": {"base": fam["base"], "experts": {s: fam["experts"][s] for s in fam["skills"]}},
                  "params": {"weight": {"low": 0.0, "high": 1.5}, "density": {"low": 0.2, "high": 1.0}}},
        "strategy": {"name": "cmaes", "diagonal": True, "popsize": 12, "sigma0": 0.3, "x0": "center"},
        "fitness": fitness,
        "engine": {"workers": 1},
        "budget": {"max_evals": 1}})


def fitness_configs(fam: dict, zoo: Path, kind: str, limit: int) -> dict:
    suffix = "_mc" if kind == "choice" else ""
    return {
        "lm_tasks": {"name": "lm_tasks", "batch_size": 32, "tasks": [
            {"name": s, "path": fam["tasks"][s + suffix], "kind": kind, "limit": limit} for s in fam["skills"]]},
        "lm_eval": {"name": "lm_eval", "batch_size": 32, "include_path": str(zoo / "lm_eval_tasks"), "limit": limit,
                    "tasks": [{"name": f"tinylm_{s}{suffix}", "metric": "acc" if kind == "choice" else "exact_match"}
                              for s in fam["skills"]]},
    }


def bench_kind(fam: dict, zoo: Path, kind: str, n: int, limit: int, threads: int) -> dict:
    from evomerge.fitness import build_fitness

    workers, startup = {}, {}
    for label, fit in fitness_configs(fam, zoo, kind, limit).items():
        cfg = run_config(fam, fit)
        workers[label] = FitnessWorker(0, cfg.space, cfg.fitness, cfg.seed, threads=threads)
        t0 = time.perf_counter()  # a second fitness: its construction alone (imports done, datasets cached)
        build_fitness(cfg.fitness)
        startup[label] = time.perf_counter() - t0
    space = workers["lm_tasks"].space
    rng = np.random.default_rng(0)
    points = [space.lower + (space.upper - space.lower) * rng.random(space.dim) for _ in range(n + 1)]
    seconds = {label: [] for label in workers}
    mismatches = 0
    for j, x in enumerate(points):
        order = list(workers) if j % 2 == 0 else list(workers)[::-1]
        scores = {}
        for label in order:
            w = workers[label]
            model = w.runtime.materialize(w.space.decode(x))
            t0 = time.perf_counter()
            f, s, _ = w.fitness.evaluate_model(model, w.runtime.tokenizer)
            dt = time.perf_counter() - t0
            scores[label] = (f, s)
            if j > 0:
                seconds[label].append(dt)
        (fa, sa), (fb, sb) = scores["lm_tasks"], scores["lm_eval"]
        mismatches += int(not np.array_equal(sa, sb) or abs(fa - fb) > 1e-12)
    holdout = {}
    for label, w in workers.items():
        model = w.runtime.materialize(w.space.decode(points[0]))
        t0 = time.perf_counter()
        w.fitness.holdout_model(model, w.runtime.tokenizer)
        holdout[label] = time.perf_counter() - t0
    med = {k: statistics.median(v) for k, v in seconds.items()}
    mean = {k: statistics.fmean(v) for k, v in seconds.items()}
    n_examples = int(len(scores["lm_eval"][1]))
    return {"examples_per_candidate": n_examples, "candidates": n,
            "median_s": {k: round(v, 4) for k, v in med.items()},
            "mean_s": {k: round(v, 4) for k, v in mean.items()},
            "overhead_s": round(med["lm_eval"] - med["lm_tasks"], 4),
            "ratio": round(med["lm_eval"] / med["lm_tasks"], 3),
            "build_fitness_s": {k: round(v, 3) for k, v in startup.items()},
            "holdout_s": {k: round(v, 3) for k, v in holdout.items()},
            "candidates_with_different_scores": mismatches}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--zoo", default="zoo/tinylm")
    ap.add_argument("--candidates", type=int, default=24)
    ap.add_argument("--kind", nargs="+", choices=["choice", "generate"], default=["choice", "generate"])
    ap.add_argument("--limit", type=int, default=64, help="examples per task (search split)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (a worker's default: 1)")
    args = ap.parse_args()
    zoo = Path(args.zoo).resolve()
    fam = json.loads((zoo / "family.json").read_text())
    if not (zoo / "lm_eval_tasks").is_dir():
        write_lm_eval_tasks(zoo / "lm_eval_tasks", fam["tasks"])
    for module in ("torch", "transformers"):  # imported before timing lm-eval's own import
        importlib.import_module(module)
    t0 = time.perf_counter()
    for module in ("lm_eval.evaluator", "lm_eval.models.huggingface", "lm_eval.tasks"):
        importlib.import_module(module)
    import_s = time.perf_counter() - t0
    report = {"zoo": str(zoo), "threads": args.threads, "lm_eval_import_s": round(import_s, 2), "kinds": {}}
    print(f"importing lm-eval (torch and transformers already imported): {import_s:.1f} s")
    for kind in args.kind:
        r = bench_kind(fam, zoo, kind, args.candidates, args.limit, args.threads)
        report["kinds"][kind] = r
        print(f"{kind}: {r['examples_per_candidate']} examples per candidate, {r['candidates']} candidates: "
              f"lm_tasks {r['median_s']['lm_tasks']:.3f} s, lm_eval {r['median_s']['lm_eval']:.3f} s per candidate "
              f"(median; overhead {r['overhead_s']:+.3f} s, x{r['ratio']}); building the fitness: lm_tasks "
              f"{r['build_fitness_s']['lm_tasks']:.2f} s, lm_eval {r['build_fitness_s']['lm_eval']:.2f} s; "
              f"candidates scored differently: {r['candidates_with_different_scores']}", flush=True)
    print(f"written {write_results(ROOT / 'bench' / 'results' / 'lm_eval.json', report)}")


if __name__ == "__main__":
    main()
