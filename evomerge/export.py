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
from .rundir import BEST, config_file, find_recipe


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
    conf = config_file(run, str(run))
    check_targets(to, mergekit)
    cfg = load_config(conf)
    chosen = None
    if preference is not None:
        if eval_id is not None:
            raise UserError("export: give --eval-id or --prefer, not both")
        eval_id, chosen = prefer(run, cfg, preference)
    if cfg.space.name not in ("hf_merge", "hf_mixture", "hf_layers"):
        raise UserError(f"{run}: space {cfg.space.name} has no recipes to export; the best model is in {run / BEST}")
    eval_id, recipe = find_recipe(run, eval_id)
    space = build_space(cfg.space, cfg.seed)
    mk = None
    if mergekit:
        mk = absolute_models(space.mergekit_config(recipe))
    done = []
    if to:
        rt = space.open_runtime("cpu")
        rt.materialize(recipe)
        write_model(rt, recipe, Path(to))
        done.append(f"model directory {to}")
        if cfg.space.name == "hf_layers":
            from .layerpath import SCALES_KEY, scaled

            if scaled(recipe["path"]):
                done[-1] += (f" (its layers' input scales are config.json's {SCALES_KEY}: evomerge.layerpath.load "
                             "applies them, from_pretrained alone ignores them)")
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
