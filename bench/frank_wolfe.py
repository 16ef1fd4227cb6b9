"""Frank-Wolfe stability: merged quality with only the relevant experts vs with 16 irrelevant ones added,
next to task arithmetic over the same two pools.

    python run.py zoo tinylm --out zoo/tinylm-pool --unrelated 16     # once, about 10 minutes
    python bench/frank_wolfe.py [--zoo zoo/tinylm-pool] [--steps 8] [--oracle black_box|gradient]
                                [--kind generate|choice]

Pools: the three skill experts of the tiny-LM family (relevant), and the same plus 16 experts
fine-tuned on skills outside the family (irrelevant). For each pool, a task-wise Frank-Wolfe
search (`--oracle`: black-box, one evaluation per pool model and step, or gradient, one evaluation
and backward pass per step; `python run.py --config ...` on Ray workers) over task-arithmetic
weights in [0, 1] (tasks scored by greedy exact match or by choice, `--kind`), and task arithmetic
with one weight for every expert: 1.0, and the best of 0.2 ... 1.0 on the search split.
Quality: mean held-out accuracy over the three tasks.
Target: Frank-Wolfe's quality with 16 irrelevant experts within 2 points of the relevant pool's.
Results: bench/results/frank_wolfe.json.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import yaml

from common import ROOT, run_py, write_results  # noqa: E402

sys.path.insert(0, str(ROOT))

from evomerge.config import load_config  # noqa: E402
from evomerge.engine.worker import FitnessWorker  # noqa: E402


def config(fam: dict, experts: list[str], steps: int, cache: str, oracle: str, kind: str) -> dict:
    skills = fam["skills"]
    suffix = "_mc" if kind == "choice" else ""
    return {"seed": 0,
            "space": {"name": "hf_merge", "method": "task_arithmetic", "layer_granularity": 0,
                      "cache_dir": cache, "params": {"weight": {"low": 0.0, "high": 1.0}},
                      "models": {"base": fam["base"], "experts": {e: fam["experts"][e] for e in experts}}},
            "strategy": {"name": "frank_wolfe", "mode": "taskwise", "steps": steps, "oracle": oracle},
            "fitness": {"name": "lm_tasks", "tasks": [{"name": s, "path": fam["tasks"][s + suffix], "kind": kind,
                                                       "limit": 64} for s in skills]},
            "engine": {"workers": 2, "batch_size": 2, "queue_depth": 2},
            "budget": {"max_evals": 100_000}}


def quality(metrics: dict, skills: list[str], split: str) -> float:
    key = "_test_accuracy" if split == "test" else "_accuracy"
    return sum(metrics[f"{s}{key}"] for s in skills) / len(skills)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--zoo", default="zoo/tinylm-pool")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--oracle", choices=["black_box", "gradient"], default="black_box")
    ap.add_argument("--kind", choices=["generate", "choice"], default="generate")
    args = ap.parse_args()
    fam = json.loads((Path(args.zoo) / "family.json").read_text())
    skills = fam["skills"]
    unrelated = [e for e in fam["experts"] if e.startswith("unrelated_")]
    if len(unrelated) < 16:
        raise SystemExit(f"{args.zoo}: {len(unrelated)} unrelated experts; build with --unrelated 16")
    pools = {"relevant (3)": list(skills), f"relevant + {len(unrelated)} irrelevant": list(skills) + unrelated}
    tmp = Path(tempfile.mkdtemp(prefix="fw-bench-"))
    rows = {}
    for label, experts in pools.items():
        cfg_path = tmp / f"{len(experts)}.yaml"
        cfg_path.write_text(yaml.safe_dump(config(fam, experts, args.steps, str(tmp / "tv"), args.oracle, args.kind)))
        out = tmp / f"run{len(experts)}"
        run_py("--config", str(cfg_path), "--out", str(out), "--no-progress", capture=False)
        summary = json.loads((out / "summary.json").read_text())
        fw = quality(summary["best"]["holdout"], skills, "test")
        cfg = load_config(cfg_path)
        worker = FitnessWorker(0, cfg.space, cfg.fitness, cfg.seed, threads=2)
        rt, fit, space = worker.runtime, worker.fitness, worker.space

        def ta(lam: float) -> dict:
            recipe = {"method": "task_arithmetic", "experts": space.labels, "seed": 0,
                      "groups": {g: {"weight": [lam] * len(space.labels)} for g in space.groups}}
            model = rt.materialize(recipe)
            _, _, train = fit.evaluate_model(model, rt.tokenizer)
            return {"train": quality(train, skills, "train"),
                    "test": quality(fit.holdout_model(model, rt.tokenizer), skills, "test")}

        grid = {lam: ta(lam) for lam in (0.2, 0.4, 0.6, 0.8, 1.0)}
        tuned = max(grid, key=lambda lam: grid[lam]["train"])
        rows[label] = {"frank_wolfe": fw, "frank_wolfe_evals": summary["evaluations"],
                       "frank_wolfe_chosen": summary["strategy"]["chosen"],
                       "frank_wolfe_weights": summary["strategy"]["final_mean_weight"],
                       "task_arithmetic_w1": grid[1.0]["test"], "task_arithmetic_tuned": grid[tuned]["test"],
                       "task_arithmetic_tuned_lambda": tuned}
        print(label, json.dumps(rows[label]), flush=True)
    a, b = rows.values()
    drops = {k: round(100 * (a[k] - b[k]), 1) for k in ("frank_wolfe", "task_arithmetic_w1", "task_arithmetic_tuned")}
    print(f"{'mean held-out accuracy':28s}{'Frank-Wolfe':>14s}{'TA w=1':>10s}{'TA tuned':>10s}")
    for label, r in rows.items():
        print(f"{label:28s}{r['frank_wolfe']:14.3f}{r['task_arithmetic_w1']:10.3f}{r['task_arithmetic_tuned']:10.3f}")
    print(f"{'drop (points)':28s}{drops['frank_wolfe']:14.1f}{drops['task_arithmetic_w1']:10.1f}"
          f"{drops['task_arithmetic_tuned']:10.1f}")
    print(f"Frank-Wolfe within 2 points: {abs(drops['frank_wolfe']) <= 2.0}")
    write_results(ROOT / "bench" / "results" / f"frank_wolfe_{args.oracle}_{args.kind}.json",
                  {"zoo": args.zoo, "steps": args.steps, "oracle": args.oracle, "kind": args.kind, "rows": rows,
                   "drop_points": drops})


if __name__ == "__main__":
    main()
