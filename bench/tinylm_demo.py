"""Tiny-LM demo figures: each expert, training-free merges and the evolved TIES merge, per task.

    python bench/tinylm_demo.py [--zoo zoo/tinylm] [--run RUN_DIR]

Builds nothing: run `python run.py zoo tinylm --out zoo/tinylm` first. Without --run it runs
`python run.py --config configs/tinylm_ties_cmaes.yaml` itself. Every model is scored on the
held-out split of the config's tasks by the real worker (resident model, in-place merges):
the experts, the uniform average (linear, weights 1/n), task arithmetic (weights 1), TIES with
mergekit's usual defaults (weight 1, density 0.5) and the evolved merge (the run's best recipe).
Target: the evolved merge >= 90% of each expert's held-out accuracy on its own task, and above
every training-free baseline. The config scores choice tasks (<skill>_mc.jsonl); every model is
also scored by greedy exact match on the same held-out prompts (<skill>.jsonl) and reported.
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

from common import ROOT, write_results  # noqa: E402

sys.path.insert(0, str(ROOT))

from evomerge.config import load_config  # noqa: E402
from evomerge.rundir import CONFIG, find_recipe  # noqa: E402
from evomerge.engine.worker import FitnessWorker  # noqa: E402

DEMO_CONFIG = "configs/tinylm_ties_cmaes.yaml"


def uniform_recipe(space, method: str, **params) -> dict:
    n = len(space.labels)
    groups = {g: {k: [v] * n for k, v in params.items()} for g in space.groups}
    return {"method": method, "experts": space.labels, "groups": groups, "seed": 0}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", help="an existing run directory of the config (default: run it now)")
    args = ap.parse_args()

    run = Path(args.run) if args.run else Path(tempfile.mkdtemp(prefix="tinylm-demo-")) / "run"
    if not args.run:
        subprocess.run([sys.executable, "run.py", "--config", DEMO_CONFIG, "--out", str(run), "--no-progress"],
                       cwd=ROOT, check=True)
    cfg = load_config(run / CONFIG)
    worker = FitnessWorker(0, cfg.space, cfg.fitness, cfg.seed, threads=2)
    space, rt, fit = worker.space, worker.runtime, worker.fitness
    tasks = [t.name for t in cfg.fitness.tasks]

    from evomerge.fitness.lm_tasks import LMTasksFitness, LMTasksFitnessConfig

    gen_tasks = [{"name": t.name, "path": t.path.replace("_mc.jsonl", ".jsonl"), "kind": "generate"}
                 for t in cfg.fitness.tasks if t.path.endswith("_mc.jsonl")]
    gen = LMTasksFitness(LMTasksFitnessConfig(name="lm_tasks", tasks=gen_tasks, batch_size=64)) if gen_tasks else None
    rows, gen_rows = {}, {}

    def score(name, model):
        rows[name] = fit.holdout_model(model, rt.tokenizer)
        if gen is not None:
            gen_rows[name] = gen.holdout_model(model, rt.tokenizer)

    for label, path in space.expert_paths.items():
        from transformers import AutoModelForCausalLM

        score(f"expert {label}", AutoModelForCausalLM.from_pretrained(path).eval())
    n = len(space.labels)
    baselines = {
        "uniform average": uniform_recipe(space, "linear", weight=1.0 / n),
        "task arithmetic (w=1)": uniform_recipe(space, "task_arithmetic", weight=1.0),
        "TIES (w=1, density=0.5)": uniform_recipe(space, "ties", weight=1.0, density=0.5),
    }
    for name, recipe in baselines.items():
        score(name, rt.materialize(recipe))
    eval_id, best = find_recipe(run, None)
    score(f"evolved (eval {eval_id})", rt.materialize(best))

    for title, table in (("held-out accuracy", rows), ("greedy exact match", gen_rows)):
        if not table:
            continue
        names = [t for t in tasks if f"{t}_test_accuracy" in next(iter(table.values()))]
        print(f"{title:31s}" + "".join(f"{t:>10s}" for t in names) + "      mean")
        for name, m in table.items():
            accs = [m[f"{t}_test_accuracy"] for t in names]
            print(f"{name:31s}" + "".join(f"{a:10.3f}" for a in accs) + f"{sum(accs) / len(accs):10.3f}")
    evolved = rows[f"evolved (eval {eval_id})"]
    verdict = {}
    for t in tasks:
        own = rows[f"expert {t}"][f"{t}_test_accuracy"] if f"expert {t}" in rows else None
        if own:
            verdict[t] = round(evolved[f"{t}_test_accuracy"] / own, 3)
    mean = lambda m: sum(m[f"{t}_test_accuracy"] for t in tasks) / len(tasks)  # noqa: E731
    beats = {name: mean(evolved) > mean(rows[name]) for name in baselines}
    print(f"evolved / expert on its own task: {verdict}; evolved mean above each baseline: {beats}")
    write_results(ROOT / "bench" / "results" / "tinylm_demo.json",
                  {"run": str(run), "rows": rows, "generate_rows": gen_rows, "ratio_to_expert": verdict,
                   "beats": beats})


if __name__ == "__main__":
    main()
