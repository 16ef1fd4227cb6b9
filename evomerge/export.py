"""Exports of a run: any evaluation's recipe as a Hugging Face model directory or a mergekit YAML."""
from __future__ import annotations

import json
from pathlib import Path

import yaml

from .config import load_config
from .errors import UserError

MERGEKIT_METHODS = {"linear", "task_arithmetic", "ties", "dare_ties", "dare_linear", "breadcrumbs",
                    "breadcrumbs_ties", "slerp"}


def find_recipe(run_dir: Path, eval_id: int | None) -> tuple[int, dict]:
    """The recipe of evaluation `eval_id` (default: the run's best) from evals.jsonl."""
    if eval_id is None:
        try:
            eval_id = json.loads((run_dir / "summary.json").read_text())["best"]["eval_id"]
        except FileNotFoundError:
            raise UserError(f"{run_dir}: no summary.json (an unfinished run?): pass --eval-id") from None
    with open(run_dir / "evals.jsonl") as f:
        for line in f:
            rec = json.loads(line)
            if rec["id"] == eval_id:
                if "recipe" not in rec:
                    raise UserError(f"{run_dir}: evaluation {eval_id} has no recipe (its space is a dense "
                                    "parameter vector; the best model is in best/)")
                return eval_id, rec["recipe"]
    raise UserError(f"--eval-id {eval_id}: no such evaluation in {run_dir / 'evals.jsonl'}")


def mergekit_config(space, recipe: dict) -> dict:
    """A mergekit YAML (as a dict) that reproduces the recipe's tensors with `mergekit-yaml`.

    Per-group values become per-tensor conditional parameters (`filter` = the full tensor
    name, which mergekit matches as a substring, first match wins).
    """
    method = recipe["method"]
    if method not in MERGEKIT_METHODS:
        raise UserError(f"--mergekit: method {method} has no mergekit equivalent")
    names = [n for n in space.base.names() if n in space.tensor_group]

    def per_tensor(param: str, index: int):
        values = [{"filter": n, "value": recipe["groups"][space.tensor_group[n]][param][index]} for n in names
                  if param in recipe["groups"][space.tensor_group[n]]]
        distinct = {v["value"] for v in values}
        return values[0]["value"] if len(distinct) == 1 else values

    base = str(space.base_path)
    experts = [str(space.expert_paths[label]) for label in recipe["experts"]]
    cfg: dict = {"merge_method": method, "dtype": "float32"}
    if method == "slerp":
        cfg["base_model"] = base
        cfg["models"] = [{"model": base}, {"model": experts[0]}]
        cfg["parameters"] = {"t": per_tensor("t", 0)}
        return cfg
    params = [p for p in ("weight", "density", "gamma") if any(p in g for g in recipe["groups"].values())]
    cfg["models"] = [{"model": path, "parameters": {p: per_tensor(p, i) for p in params}}
                     for i, path in enumerate(experts)]
    if method != "linear":
        cfg["base_model"] = base
    globals_ = {}
    if "normalize" in recipe:
        globals_["normalize"] = recipe["normalize"]
    if globals_:
        cfg["parameters"] = globals_
    return cfg


def prefer(run: Path, cfg, text: str) -> tuple[int, dict]:
    """The Pareto-front evaluation with the largest preference-weighted sum of objectives."""
    from fitness import FITNESSES

    from .pareto import front_of_run, parse_preference, preferred

    objectives = FITNESSES[cfg.fitness.name][1].objectives(cfg.fitness)
    if len(objectives) < 2:
        raise UserError("--prefer: this run's fitness has a single objective; use --eval-id or the best")
    chosen = preferred(front_of_run(run, objectives), parse_preference(text, objectives))
    return chosen["eval_id"], chosen


def export(run_dir: str, eval_id: int | None, to: str | None, mergekit: str | None,
           preference: str | None = None) -> str:
    from .spaces import build_space

    run = Path(run_dir)
    if not (run / "config.yaml").exists():
        raise UserError(f"{run}: not a run directory (no config.yaml)")
    cfg = load_config(run / "config.yaml")
    chosen = None
    if preference is not None:
        if eval_id is not None:
            raise UserError("export: give --eval-id or --prefer, not both")
        eval_id, chosen = prefer(run, cfg, preference)
    if cfg.space.name not in ("hf_merge", "hf_mixture"):
        raise UserError(f"{run}: space {cfg.space.name} has no recipes to export; the best model is in {run / 'best'}")
    eval_id, recipe = find_recipe(run, eval_id)
    space = build_space(cfg.space, cfg.seed)
    done = []
    if mergekit:
        mk = space.mergekit_config(recipe) if hasattr(space, "mergekit_config") else mergekit_config(space, recipe)
        Path(mergekit).write_text(yaml.safe_dump(mk, sort_keys=False))
        done.append(f"mergekit config {mergekit}")
    if to:
        out = Path(to)
        if out.exists() and any(out.iterdir()):
            raise UserError(f"--to {out}: already exists and is not empty")
        rt = space.open_runtime("cpu")
        rt.materialize(recipe)
        rt.save(out)
        (out / "recipe.json").write_text(json.dumps(recipe, indent=2) + "\n")
        done.append(f"model directory {out}")
    why = "" if chosen is None else " (Pareto front, preferred: " + ", ".join(
        f"{k} {v:.4g}" for k, v in chosen["objectives"].items()) + ")"
    return f"exported evaluation {eval_id}{why} as " + " and ".join(done)
