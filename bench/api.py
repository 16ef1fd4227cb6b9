"""API-only models: throughput of the API fitness, faults and budget, and Evo-Merging over a repository.

    python run.py zoo tinylm --out zoo/tinylm                       # the three skill experts
    python run.py zoo tinylm --out zoo/tinylm-repo --unrelated 29   # 3 relevant + 29 unrelated experts
    python bench/api.py [--only throughput faults evo]

Every request goes through `python run.py serve` (the project's OpenAI-compatible server, on loopback)
and the official `openai` client.
1. throughput: the api fitness (merge mode: the candidate's weights travel in each request) on the
   tiny LM's three generate tasks (16 train prompts each, responses not cached), concurrency 1, 4, 16;
   evaluations/s and requests/s over 6 candidates each (--evals), the server's rows per batch (those that
   joined a running batch included, and counted) and the share of the time its model was busy (the
   server's torch on --threads threads, default 1: on a small shared machine the client needs a core too).
2. faults: the server fails 20% of requests (429, 500, a reply slower than the client's timeout, a
   malformed body); a CMA-ES search of 40 evaluations on 2 workers: evaluations lost (failed) and
   retries; then a search with `max_requests: 400` (no cache): how many requests reached the server.
3. evo: Evo-Merging over the 32 experts of zoo/tinylm-repo (weights in [-1, 1], choice tasks, 16 train
   prompts per task; popsize 8, 10 stage-2 generations, as bench/evo_stage1.py): experts kept by stage 1,
   the best merge's held-out accuracy, against task arithmetic over all 32 experts and over the 3
   relevant ones (lambda 1, and tuned on the search split).
Results: bench/results/api.json.
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
import yaml

from common import ROOT, run_py, write_results

sys.path.insert(0, str(ROOT))

from evomerge.serve.harness import LocalServer  # noqa: E402
from evomerge.fitness.api import APIFitness, APIFitnessConfig  # noqa: E402

SKILLS = ["upper", "sort", "count"]


def serve_config(zoo: Path, experts: list[str], tmp: Path) -> Path:
    cfg = {"space": {"name": "hf_merge", "method": "task_arithmetic", "layer_granularity": 0,
                     "models": {"base": str(zoo / "base"), "experts": {e: str(zoo / "experts" / e) for e in experts}}},
           "strategy": {"name": "random"},
           "fitness": {"name": "lm_tasks", "tasks": [{"name": "upper", "path": str(zoo / "tasks" / "upper.jsonl"),
                                                      "kind": "generate"}]}}
    path = tmp / f"serve-{len(experts)}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def tasks(zoo: Path, kind: str, limit: int) -> list[dict]:
    suffix = "_mc" if kind == "choice" else ""
    return [{"name": s, "path": str(zoo / "tasks" / f"{s}{suffix}.jsonl"), "kind": kind, "limit": limit}
            for s in SKILLS]


def throughput(zoo: Path, tmp: Path, evals: int = 6, threads: int = 1) -> dict:
    """Evaluations/s of the api fitness at client concurrency 1, 4, 16 against one server (its model on
    `threads` torch threads), with the server's batches and the share of the time its model was busy."""
    out = {"server_threads": threads, "evals_per_concurrency": evals}
    with LocalServer("--config", str(serve_config(zoo, SKILLS, tmp)), env={"OMP_NUM_THREADS": str(threads)}) as srv:
        rng = np.random.default_rng(0)
        for conc in (1, 4, 16):
            fit = APIFitness(APIFitnessConfig(name="api", base_url=srv.url, tasks=tasks(zoo, "generate", 16),
                                              concurrency=conc, cache_size=0))
            fit.evaluate_recipe({"weights": {s: 0.5 for s in SKILLS}})  # warm-up
            before = srv.health()
            t0, requests = time.perf_counter(), 0
            for _ in range(evals):
                _, _, m = fit.evaluate_recipe({"weights": {s: float(w) for s, w in zip(SKILLS, rng.uniform(0, 1, 3))}})
                requests += m["api_requests"]
            dt = time.perf_counter() - t0
            h = srv.health()
            batches = h["batches"] - before["batches"]
            out[conc] = {"evals_per_s": round(evals / dt, 3), "requests_per_s": round(requests / dt, 1),
                         "requests_per_eval": requests / evals,
                         "rows_per_batch": round((h["batched_rows"] - before["batched_rows"]) / max(batches, 1), 2),
                         "joined_rows": h["joined_rows"] - before["joined_rows"],
                         "model_busy": round((h["busy_s"] - before["busy_s"]) / dt, 3)}
            fit.pool.shutdown()
            print(f"concurrency {conc}: {out[conc]}", flush=True)
    out["speedup_16_over_1"] = round(out[16]["evals_per_s"] / out[1]["evals_per_s"], 2)
    print(f"speedup at 16 over 1: {out['speedup_16_over_1']}x", flush=True)
    return out


def search_config(zoo: Path, url: str, experts: list[str], strategy: dict, fitness: dict, evals: int,
                  weight=(0.0, 1.0)) -> dict:
    return {"seed": 0, "space": {"name": "api_weights", "models": experts,
                                 "weight": {"low": weight[0], "high": weight[1]}},
            "strategy": strategy,
            "fitness": {"name": "api", "base_url": url, **fitness},
            "engine": {"workers": 2, "batch_size": 1, "queue_depth": 2},
            "budget": {"max_evals": evals}}


def run_search(cfg: dict, tmp: Path, name: str) -> tuple[dict, list[dict], float]:
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    out = tmp / name
    t0 = time.perf_counter()
    run_py("--config", str(path), "--out", str(out), "--no-progress")
    evals = [json.loads(line) for line in (out / "evals.jsonl").read_text().splitlines()]
    return json.loads((out / "summary.json").read_text()), evals, time.perf_counter() - t0


def faults(zoo: Path, tmp: Path) -> dict:
    with LocalServer("--config", str(serve_config(zoo, SKILLS, tmp)), "--chaos", "0.2",
                     "--chaos-timeout-s", "1.5") as srv:
        fit = {"tasks": tasks(zoo, "generate", 16), "timeout_s": 0.75, "backoff_s": 0.05, "concurrency": 4}
        strategy = {"name": "cmaes", "popsize": 8, "sigma0": 0.3, "x0": "center"}
        summary, evals, secs = run_search(search_config(zoo, srv.url, SKILLS, strategy, fit, 40), tmp, "faults")
        chaos = srv.health()["chaos"]
        res = {"evaluations": len(evals), "failed": sum(bool(e.get("failed")) for e in evals),
               "retries": sum(e.get("metrics", {}).get("api_retries", 0) for e in evals),
               "requests": sum(e.get("metrics", {}).get("api_requests", 0) for e in evals),
               "injected": {k: v for k, v in chaos.items() if k != "posts"}, "posts": chaos["posts"],
               "seconds": round(secs, 1)}
        print("faults:", json.dumps(res), flush=True)
        before = srv.health()["chaos"]["posts"]
        summary, evals, _ = run_search(search_config(zoo, srv.url, SKILLS, strategy,
                                                     {**fit, "max_requests": 400, "cache_size": 0}, 1000),
                                       tmp, "budget")
        res["budget"] = {"max_requests": 400, "requests_received": srv.health()["chaos"]["posts"] - before,
                         "stop_reason": summary["stop_reason"], "evaluations": summary["evaluations"],
                         "failed": summary["failed"]}
        print("budget:", json.dumps(res["budget"]), flush=True)
    return res


def evo(repo: Path, tmp: Path) -> dict:
    fam = json.loads((repo / "family.json").read_text())
    experts = list(fam["experts"])
    relevant = [e for e in experts if e in SKILLS]
    with LocalServer("--config", str(serve_config(repo, experts, tmp))) as srv:
        fit = {"tasks": tasks(repo, "choice", 16), "concurrency": 8}
        strategy = {"name": "evo_merging", "popsize": 8, "sigma0": 0.3, "generations": 10}
        # a cap only (generations ends the run): stage 1 makes at most 4 rounds (slices) of the base and
        # 64 probes, then 10 generations of 8
        evals_budget = (1 + 2 * len(experts)) * 4 + 8 * 10
        summary, evals, secs = run_search(search_config(repo, srv.url, experts, strategy, fit, evals_budget,
                                                        weight=(-1.0, 1.0)), tmp, "evo")
        st = summary["strategy"]
        kept = st["kept"]
        res = {"experts": len(experts), "relevant": relevant, "kept": kept,
               "relevant_kept_fraction": sum(e in kept for e in relevant) / len(relevant),
               "irrelevant_kept": [e for e in kept if e not in relevant], "sign": st["sign"],
               "evaluations": summary["evaluations"], "seconds": round(secs, 1),
               "evo_merging": summary["best"]["holdout"], "evo_merging_weights": st.get("cma_best_weights")}
        api = APIFitness(APIFitnessConfig(name="api", base_url=srv.url, tasks=tasks(repo, "choice", 16), concurrency=8))

        def ta(pool: list[str]) -> dict:
            grid = {}
            for lam in (0.1, 0.2, 0.3, 0.5, 1.0):
                recipe = {"weights": {e: (lam if e in pool else 0.0) for e in experts}}
                grid[lam] = (api.evaluate_recipe(recipe)[0], recipe)
            tuned = max(grid, key=lambda lam: grid[lam][0])
            return {"lambda_1": api.holdout_recipe(grid[1.0][1]), "tuned_lambda": tuned,
                    "tuned": api.holdout_recipe(grid[tuned][1])}

        res["task_arithmetic_all"] = ta(experts)
        res["task_arithmetic_relevant"] = ta(relevant)
    mean = lambda m: float(np.mean([m[f"{s}_test_accuracy"] for s in SKILLS]))  # noqa: E731
    rows = {"Evo-Merging": mean(res["evo_merging"]),
            "TA all, lambda 1": mean(res["task_arithmetic_all"]["lambda_1"]),
            f"TA all, tuned ({res['task_arithmetic_all']['tuned_lambda']})": mean(res["task_arithmetic_all"]["tuned"]),
            "TA relevant, lambda 1": mean(res["task_arithmetic_relevant"]["lambda_1"]),
            f"TA relevant, tuned ({res['task_arithmetic_relevant']['tuned_lambda']})":
                mean(res["task_arithmetic_relevant"]["tuned"])}
    res["mean_test_accuracy"] = rows
    print("evo:", json.dumps({k: v for k, v in res.items() if k not in ("task_arithmetic_all",
                                                                      "task_arithmetic_relevant")}), flush=True)
    for name, v in rows.items():
        print(f"  {name:32s} {v:.3f}")
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--zoo", default="zoo/tinylm")
    ap.add_argument("--repo", default="zoo/tinylm-repo")
    ap.add_argument("--only", nargs="*", default=["throughput", "faults", "evo"])
    ap.add_argument("--evals", type=int, default=6, help="throughput: evaluations per concurrency")
    ap.add_argument("--threads", type=int, default=1, help="throughput: the server's torch threads")
    args = ap.parse_args()
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    tmp = Path(tempfile.mkdtemp(prefix="api-bench-"))
    zoo, repo = (ROOT / args.zoo).resolve(), (ROOT / args.repo).resolve()
    results = {}
    if "throughput" in args.only:
        results["throughput"] = throughput(zoo, tmp, args.evals, args.threads)
    if "faults" in args.only:
        results["faults"] = faults(zoo, tmp)
    if "evo" in args.only:
        results["evo"] = evo(repo, tmp)
    write_results(ROOT / "bench" / "results" / "api.json", results, merge=True)


if __name__ == "__main__":
    main()
