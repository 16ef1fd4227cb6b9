"""Exports of a run: any evaluation's recipe as a Hugging Face model directory or a mergekit YAML (with
absolute model paths, so that it works from any directory)."""
from __future__ import annotations

import json
import os
import shutil
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
    from evomerge.fitness import FITNESSES

    from .pareto import front_of_run, parse_preference, preferred

    objectives = FITNESSES[cfg.fitness.name][1].objectives(cfg.fitness)
    if len(objectives) < 2:
        raise UserError("--prefer: this run's fitness has a single objective; use --eval-id or the best")
    chosen = preferred(front_of_run(run, objectives), parse_preference(text, objectives))
    return chosen["eval_id"], chosen


def absolute_models(cfg):
    """The mergekit config with local model paths absolute: `mergekit-yaml` reads them from its own working
    directory, and a run's config may name its models relative to where the run was started."""
    if isinstance(cfg, dict):
        out = {}
        for k, v in cfg.items():
            if k in ("model", "base_model") and isinstance(v, str) and Path(v).expanduser().exists():
                v = str(Path(v).expanduser().resolve())
            out[k] = absolute_models(v)
        return out
    if isinstance(cfg, list):
        return [absolute_models(v) for v in cfg]
    return cfg


def check_targets(to: str | None, mergekit: str | None) -> None:
    """Every refusal of --to and --mergekit, before anything is written."""
    out = Path(to) if to else None
    if out is not None:
        if out.exists() and not out.is_dir():
            raise UserError(f"--to {out}: exists and is not a directory")
        if out.is_dir() and any(out.iterdir()):
            raise UserError(f"--to {out}: already exists and is not empty")
        parent = out.resolve().parent
        while not parent.exists():
            parent = parent.parent
        if not os.access(parent, os.W_OK | os.X_OK):
            raise UserError(f"--to {out}: {parent} is not writable")
    if mergekit:
        mk = Path(mergekit)
        if mk.is_dir():
            raise UserError(f"--mergekit {mk}: is a directory")
        parent = mk.resolve().parent
        if out is not None and parent == out.resolve():
            return  # a file inside the model directory (written first)
        if not parent.is_dir():
            raise UserError(f"--mergekit {mk}: no directory {parent}")
        if not os.access(parent, os.W_OK | os.X_OK):
            raise UserError(f"--mergekit {mk}: {parent} is not writable")


def write_model(rt, recipe: dict, out: Path) -> None:
    """The merged model as a directory: written in a hidden sibling, moved into place once complete."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.resolve().parent / f".{out.resolve().name}.export-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        rt.save(tmp)
        (tmp / "recipe.json").write_text(json.dumps(recipe, indent=2) + "\n")
        if out.is_dir():  # an empty directory given: its entries move in
            for f in tmp.iterdir():
                os.replace(f, out / f.name)
            tmp.rmdir()
        else:
            os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def export(run_dir: str, eval_id: int | None, to: str | None, mergekit: str | None,
           preference: str | None = None) -> str:
    """Write evaluation `eval_id` (default: the best) as a model directory (`to`) and / or a mergekit YAML
    with absolute model paths (`mergekit`). Every refusal comes before anything is written; the files get
    the permissions of any file this process writes (the umask's)."""
    from .spaces import build_space

    run = Path(run_dir)
    if not (run / "config.yaml").exists():
        raise UserError(f"{run}: not a run directory (no config.yaml)")
    check_targets(to, mergekit)
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
    mk = None
    if mergekit:
        mk = space.mergekit_config(recipe) if hasattr(space, "mergekit_config") else mergekit_config(space, recipe)
        mk = absolute_models(mk)
    done = []
    if to:
        rt = space.open_runtime("cpu")
        rt.materialize(recipe)
        write_model(rt, recipe, Path(to))
        done.append(f"model directory {to}")
    if mk is not None:
        path = Path(mergekit)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        try:
            tmp.write_text(yaml.safe_dump(mk, sort_keys=False))
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
        done.insert(0, f"mergekit config {mergekit}")
    why = "" if chosen is None else " (Pareto front, preferred: " + ", ".join(
        f"{k} {v:.4g}" for k, v in chosen["objectives"].items()) + ")"
    return f"exported evaluation {eval_id}{why} as " + " and ".join(done)
