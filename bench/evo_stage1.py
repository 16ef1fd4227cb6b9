"""Evo-Merging's stage 1 decided by statistics, on the 32-expert repository (issue 16, figure 3).

    python run.py zoo tinylm --out zoo/tinylm-repo --unrelated 29   # 3 relevant + 29 unrelated experts
    python bench/evo_stage1.py [--rules test gain] [--seeds 0]

As bench/api.py's `evo` part (its helpers, imported): `python run.py serve` over the 32 experts, the api
fitness (merge mode, the three choice tasks, 16 train prompts each), api_weights in [-1, 1], Evo-Merging
with popsize 8, sigma0 0.3, 10 stage-2 generations (`generations: 10`; the run's max_evals only a cap).
`--generations` shortens stage 2 (a quicker stage-1 figure; the held-out figure needs 10).
Stage 1 has today's probe budget (the base and 64 probes on all 48 search examples: probe_budget's
default), spent sequentially when the engine scores example subsets (Candidate.examples). Per rule:
relevant experts kept (target 3/3), irrelevant kept (target <= 3 of 29; `rule: gain`, the old one, kept
19), stage-1 examples scored, and the held-out mean accuracy of the best merge (target >= 0.70; task
arithmetic told the relevant experts, lambda tuned on the search split, is computed as the reference).
Results: bench/results/evo_stage1.json.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from api import SKILLS, run_search, search_config, serve_config, tasks
from common import ROOT, write_results

sys.path.insert(0, str(ROOT))

from evomerge.fitness.api import APIFitness, APIFitnessConfig  # noqa: E402
from evomerge.serve.harness import LocalServer  # noqa: E402

GENERATIONS, POPSIZE = 10, 8


def mean_test(m: dict) -> float:
    return float(np.mean([m[f"{s}_test_accuracy"] for s in SKILLS]))


def one(repo: Path, url: str, experts: list[str], relevant: list[str], rule: str, seed: int, tmp: Path,
        generations: int = GENERATIONS) -> dict:
    fit = {"tasks": tasks(repo, "choice", 16), "concurrency": 8}
    strategy = {"name": "evo_merging", "popsize": POPSIZE, "sigma0": 0.3, "generations": generations, "rule": rule}
    cap = (1 + 2 * len(experts)) * 4 + POPSIZE * generations  # 4 slices at most per probe, then stage 2
    cfg = search_config(repo, url, experts, strategy, fit, cap, weight=(-1.0, 1.0))
    cfg["seed"] = seed
    summary, evals, secs = run_search(cfg, tmp, f"evo-{rule}-{seed}")
    st = summary["strategy"]
    kept = st["kept"]
    tests = st.get("tests") or {}
    res = {"rule": rule, "seed": seed, "kept": kept, "sign": st["sign"],
           "relevant_kept": sum(e in kept for e in relevant), "irrelevant_kept": [e for e in kept if e not in relevant],
           "stage1_rounds": tests.get("rounds"), "stage1_examples_scored": tests.get("examples_scored"),
           "probe_budget": tests.get("probe_budget"), "significant_probes": tests.get("significant"),
           "kept_probe_tests": {k: v for k, v in (tests.get("probes") or {}).items() if v["kept"]},
           "evaluations": summary["evaluations"], "seconds": round(secs, 1),
           "holdout": summary["best"]["holdout"], "mean_test_accuracy": mean_test(summary["best"]["holdout"]),
           "cma_best_weights": st.get("cma_best_weights")}
    print(f"{rule} seed {seed}: relevant kept {res['relevant_kept']}/3, irrelevant kept "
          f"{len(res['irrelevant_kept'])}/29, stage-1 examples {res['stage1_examples_scored']} "
          f"(budget {res['probe_budget']}, {res['stage1_rounds']} rounds), held-out mean "
          f"{res['mean_test_accuracy']:.3f}, {res['evaluations']} evaluations, {secs:.0f} s", flush=True)
    return res


def reference(repo: Path, url: str, experts: list[str], relevant: list[str]) -> dict:
    api = APIFitness(APIFitnessConfig(name="api", base_url=url, tasks=tasks(repo, "choice", 16), concurrency=8))
    grid = {}
    for lam in (0.1, 0.2, 0.3, 0.5, 1.0):
        recipe = {"weights": {e: (lam if e in relevant else 0.0) for e in experts}}
        grid[lam] = (api.evaluate_recipe(recipe)[0], recipe)
    tuned = max(grid, key=lambda lam: grid[lam][0])
    out = {"tuned_lambda": tuned, "mean_test_accuracy": mean_test(api.holdout_recipe(grid[tuned][1]))}
    print(f"task arithmetic, the relevant experts, lambda {tuned}: held-out mean {out['mean_test_accuracy']:.3f}")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repo", default="zoo/tinylm-repo")
    ap.add_argument("--rules", nargs="*", default=["test"], choices=["test", "gain"])
    ap.add_argument("--seeds", nargs="*", type=int, default=[0])
    ap.add_argument("--generations", type=int, default=GENERATIONS, help="stage-2 generations (today's: 10)")
    ap.add_argument("--no-reference", action="store_true", help="skip task arithmetic over the relevant experts")
    args = ap.parse_args()
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    repo = (ROOT / args.repo).resolve()
    fam = json.loads((repo / "family.json").read_text())
    experts = list(fam["experts"])
    relevant = [e for e in experts if e in SKILLS]
    tmp = Path(tempfile.mkdtemp(prefix="evo-stage1-"))
    t0 = time.perf_counter()
    results: dict = {"experts": len(experts), "relevant": relevant, "runs": [],
                     "command": "python bench/evo_stage1.py " + " ".join(sys.argv[1:])}
    with LocalServer("--config", str(serve_config(repo, experts, tmp))) as srv:
        for rule in args.rules:
            for seed in args.seeds:
                results["runs"].append(one(repo, srv.url, experts, relevant, rule, seed, tmp, args.generations))
                write_results(ROOT / "bench" / "results" / "evo_stage1.json", results)  # after each run
        if not args.no_reference:
            results["task_arithmetic_relevant"] = reference(repo, srv.url, experts, relevant)
    results["seconds"] = round(time.perf_counter() - t0, 1)
    write_results(ROOT / "bench" / "results" / "evo_stage1.json", results)


if __name__ == "__main__":
    main()
