"""Scoring on example subsets and racing against scoring every example: held-out accuracy and examples scored.

    python run.py zoo tinylm --out zoo/tinylm
    python bench/subsets.py [--seeds 0 1 2] [--variants full subsets race] [--config configs/tinylm_ties_cmaes.yaml]

Each variant is the real command (`python run.py --config ... --set ...`) on the config (default: the
layer-wise TIES merge of the three tiny-LM experts searched by CMA-ES, 720 candidates, 3 choice tasks of
64 search examples) at the same number of candidates:
- full: every candidate scored on all 192 search examples (today's behaviour);
- subsets: each CMA-ES generation scored on its own stratified subset (`scoring.subsample`);
- race: subsets plus racing (`scoring.race`): a generation first scored on a slice of its subset,
  the candidates that cannot reach CMA-ES's mu best stopped there.
The best is re-scored on all examples before it is reported (`scoring.verify_top`), so every variant's
held-out table (the best merge's test accuracy per task, 200 held-out examples each) is of a full score.
Examples scored: summary.json's scoring.examples_scored (verification included); a full run scores
evaluations x 192. Results: bench/results/subsets.json.
"""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

from common import ROOT, run_py, write_results

VARIANTS = {
    "full": [],
    "subsets": ["scoring.subsample=40"],
    "race": ["scoring.subsample=48", "scoring.race.first=0.34", "scoring.race.min_first=16"],
}


def one(config: Path, variant: str, seed: int, tmp: Path) -> dict:
    out = tmp / f"{variant}-{seed}"
    sets = [f"seed={seed}", *VARIANTS[variant]]
    r = run_py("--config", str(config), "--out", str(out), "--no-progress", *sum((["--set", s] for s in sets), []),
               check=False)
    if r.returncode != 0:
        raise SystemExit(f"{variant} seed {seed} failed:\n{r.stderr[-3000:]}")
    s = json.loads((out / "summary.json").read_text())
    hold = {k[:-len("_test_accuracy")]: v for k, v in s["best"]["holdout"].items() if k.endswith("_test_accuracy")}
    n_examples = s["scoring"]["examples"] if "scoring" in s else None
    scored = s["scoring"]["examples_scored"] if "scoring" in s else None
    return {"seed": seed, "evaluations": s["evaluations"], "best_fitness": s["best"]["fitness"],
            "heldout": hold, "heldout_mean": statistics.mean(hold.values()), "examples_scored": scored,
            "search_seconds": s["search_seconds"], "scoring": s.get("scoring"), "n_examples": n_examples}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=str(ROOT / "configs" / "tinylm_ties_cmaes.yaml"))
    ap.add_argument("--seeds", type=int, nargs="*", default=[0, 1, 2])
    ap.add_argument("--variants", nargs="*", default=list(VARIANTS), choices=list(VARIANTS))
    args = ap.parse_args()
    config = Path(args.config).resolve()
    results: dict = {"config": str(config.relative_to(ROOT)) if config.is_relative_to(ROOT) else str(config),
                     "variants": {v: VARIANTS[v] for v in args.variants}, "runs": {}}
    with tempfile.TemporaryDirectory(prefix="evomerge-subsets-") as tmp:
        for variant in args.variants:
            rows = []
            for seed in args.seeds:
                rows.append(one(config, variant, seed, Path(tmp)))
                print(variant, {k: rows[-1][k] for k in ("seed", "best_fitness", "heldout_mean", "examples_scored",
                                                           "search_seconds")}, flush=True)
            results["runs"][variant] = rows
    full = results["runs"].get("full")
    n_search = None
    for rows in results["runs"].values():
        n_search = n_search or next((r["n_examples"] for r in rows if r["n_examples"]), None)
    table = {}
    for variant, rows in results["runs"].items():
        scored = [r["examples_scored"] if r["examples_scored"] is not None else r["evaluations"] * (n_search or 0)
                  for r in rows]
        table[variant] = {"heldout_mean": round(statistics.mean(r["heldout_mean"] for r in rows), 4),
                          "heldout_per_seed": [round(r["heldout_mean"], 4) for r in rows],
                          "best_fitness_mean": round(statistics.mean(r["best_fitness"] for r in rows), 4),
                          "examples_scored_mean": statistics.mean(scored),
                          "search_seconds_mean": round(statistics.mean(r["search_seconds"] for r in rows), 1)}
    if full:
        for variant, row in table.items():
            row["heldout_points_vs_full"] = round(100 * (row["heldout_mean"] - table["full"]["heldout_mean"]), 2)
            share = row["examples_scored_mean"] / table["full"]["examples_scored_mean"]
            row["examples_share_of_full"] = round(share, 4)
    results["table"] = table
    print(json.dumps(table, indent=2))
    print(f"wrote {write_results(ROOT / 'bench' / 'results' / 'subsets.json', results)}")


if __name__ == "__main__":
    main()
