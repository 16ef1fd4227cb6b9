"""Figure 3: parameter-space merging (PS), data-flow merging (DFS) and PS+DFS on the tiny-LM family, at equal
total evaluations: the held-out mean accuracy (the lm_tasks fitness's test split, the three tasks unweighted)
of each run's best, over seeds.

    python bench/dfs.py [--seeds 0 1 2] [--evals 720] [--quick]

- PS: configs/tinylm_ties_cmaes.yaml (layer-wise TIES, CMA-ES), `--evals` evaluations.
- DFS: configs/tinylm_dfs_cmaes.yaml (the layer path over base + upper, sort, count; per-jump input scales),
  `--evals` evaluations.
- PS+DFS: the PS search for half the evaluations, then configs/tinylm_ps_dfs.yaml for the other half, whose
  seed models are that run's best (experts.ps = the PS run's directory) and the three experts.
Each run is `python run.py --config C --set seed=S --set budget.max_evals=N` in a temporary directory
(~60-80 s per 720 evaluations on 2 cores). --quick: one seed, 48 evaluations per variant (a check that it
runs, not a figure). Results: bench/results/dfs.json (per run and the mean over seeds per variant), updated
after every run ("complete": false until all have run). Needs zoo/tinylm (python run.py zoo tinylm --out zoo/tinylm).
"""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

from common import ROOT, run_summary, write_results

CONFIGS = ROOT / "configs"
RESULTS = ROOT / "bench" / "results" / "dfs.json"
VARIANTS = ("ps", "dfs", "ps_dfs")


def one(config: Path, out: Path, seed: int, evals: int, *sets: str) -> dict:
    args = ["--config", str(config), "--out", str(out), "--set", f"seed={seed}", "--set", f"budget.max_evals={evals}"]
    for s in sets:
        args += ["--set", s]
    s, holdout, wall = run_summary(*args)
    best = s["best"]
    accs = [v for k, v in holdout.items() if k.endswith("_test_accuracy")]
    recipe = json.loads((out / "best" / "recipe.json").read_text())
    row = {"evaluations": s["evaluations"], "best_fitness": best["fitness"], "best_eval_id": best["eval_id"],
           "holdout": holdout, "holdout_mean_accuracy": statistics.fmean(accs) if accs else None,
           "wall_seconds": wall}
    if recipe.get("method") == "layers":
        row["path"] = " ".join(f"{p['model']}.{p['layer']}" + (f"x{p['scale']:.2f}" if "scale" in p else "")
                               for p in recipe["path"])
    return row


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--evals", type=int, default=720, help="evaluations per variant (PS+DFS: half each stage)")
    ap.add_argument("--quick", action="store_true", help="one seed, 48 evaluations per variant")
    args = ap.parse_args(argv)
    if not (ROOT / "zoo" / "tinylm" / "family.json").exists():
        raise SystemExit("zoo/tinylm is not built (python run.py zoo tinylm --out zoo/tinylm)")
    seeds, evals = ([args.seeds[0]], 48) if args.quick else (args.seeds, args.evals)
    half = evals // 2
    runs: dict[str, dict] = {}
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench_dfs_") as tmp:
        tmp = Path(tmp)
        for seed in seeds:
            runs[f"ps_s{seed}"] = one(CONFIGS / "tinylm_ties_cmaes.yaml", tmp / f"ps_s{seed}", seed, evals)
            save(runs, seeds, evals, False)
            runs[f"dfs_s{seed}"] = one(CONFIGS / "tinylm_dfs_cmaes.yaml", tmp / f"dfs_s{seed}", seed, evals)
            save(runs, seeds, evals, False)
            first = one(CONFIGS / "tinylm_ties_cmaes.yaml", tmp / f"ps_half_s{seed}", seed, half)
            second = one(CONFIGS / "tinylm_ps_dfs.yaml", tmp / f"ps_dfs_s{seed}", seed, evals - half,
                         f"space.models.experts.ps={tmp / f'ps_half_s{seed}'}")
            runs[f"ps_dfs_s{seed}"] = {**second, "ps_stage": first,
                                       "evaluations": first["evaluations"] + second["evaluations"],
                                       "wall_seconds": first["wall_seconds"] + second["wall_seconds"]}
            save(runs, seeds, evals, False)
    out = save(runs, seeds, evals, True, round(time.perf_counter() - t0, 1))
    print(json.dumps(json.loads(out.read_text())["mean"], indent=2))
    return 0


def save(runs: dict, seeds: list[int], evals: int, complete: bool, seconds: float | None = None) -> Path:
    if not complete:
        name = list(runs)[-1]
        print(name, json.dumps(runs[name]), flush=True)
    mean = {}
    for v in VARIANTS:
        rows = [r for k, r in runs.items() if k.rsplit("_s", 1)[0] == v]
        if rows:
            vals = [r["holdout_mean_accuracy"] for r in rows]
            mean[v] = {"holdout_mean_accuracy": round(statistics.fmean(vals), 4),
                       "holdout_mean_accuracy_sd": round(statistics.stdev(vals), 4) if len(vals) > 1 else None,
                       "best_fitness": round(statistics.fmean(r["best_fitness"] for r in rows), 4),
                       "evaluations": round(statistics.fmean(r["evaluations"] for r in rows), 1),
                       "seeds": len(rows)}
    data = {"evals_per_variant": evals, "seeds": seeds, "complete": complete, "mean": mean, "runs": runs}
    if seconds is not None:
        data["seconds"] = seconds
    return write_results(RESULTS, data)


if __name__ == "__main__":
    raise SystemExit(main())
