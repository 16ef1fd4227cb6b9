"""Passthrough layer stacking (data-flow merging): a model built from layer ranges of its inputs.

A recipe is a list of slices, each `{"model": label, "layers": [start, end]}` (end exclusive,
mergekit's `layer_range`); the output's blocks are the slices' blocks in order, renumbered.
As in mergekit, the embeddings come from the first slice's model and the final norm and head
from the last slice's model; the config and tokenizer are the base's.
"""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

from .errors import UserError
from .weights import Checkpoint, group_of, layer_index

_BLOCK = re.compile(r"((?:^|\.)(?:layers|h|blocks|layer)\.)(\d+)(\.)")


def stack_layers(base: Path, models: dict[str, Path], slices: list[dict], out: Path) -> int:
    """Write the stacked model to `out` (config, safetensors, tokenizer files); returns its number of layers."""

    from .files import save_safetensors

    cks = {label: Checkpoint.open(p) for label, p in models.items()}
    base_ck = Checkpoint.open(base)
    tensors, n, used = {}, 0, set()
    for k, sl in enumerate(slices):
        label, (start, end) = sl["model"], sl["layers"]
        if label not in cks:
            raise UserError(f"slices[{k}].model: {label!r} is not one of {sorted(cks)}")
        ck = cks[label]
        depth = 1 + max((layer_index(nm) for nm in ck.names() if layer_index(nm) is not None), default=-1)
        if not 0 <= start < end <= depth:
            raise UserError(f"slices[{k}].layers: [{start}, {end}] is outside the {depth} layers of {label}")
        for i in range(start, end):
            for name in ck.names():
                if layer_index(name) == i:
                    new = _BLOCK.sub(lambda m: f"{m.group(1)}{n}{m.group(3)}", name, count=1)
                    t = ck.tensor(name).contiguous()
                    tensors[new] = t.clone() if (label, name) in used else t  # a repeated layer: its own copy
                    used.add((label, name))
            n += 1
    first, last = cks[slices[0]["model"]], cks[slices[-1]["model"]]
    for name in base_ck.names():
        if layer_index(name) is None:
            tensors[name] = (first if group_of(name) == "embed" else last).tensor(name).contiguous()
    out.mkdir(parents=True, exist_ok=True)
    save_safetensors(tensors, out / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((Path(base) / "config.json").read_text())
    for key in ("num_hidden_layers", "n_layer", "num_layers"):
        if key in config:
            config[key] = n
    if isinstance(config.get("layer_types"), list):
        config["layer_types"] = [config["layer_types"][0]] * n
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    for f in Path(base).iterdir():
        if f.name.startswith(("tokenizer", "special_tokens", "generation_config")) or f.suffix == ".model":
            shutil.copyfile(f, out / f.name)  # the contents, with this process's permissions (not the source's)
    return n


def mergekit_passthrough(models: dict[str, Path], slices: list[dict]) -> dict:
    """The same stacking as a mergekit YAML (merge_method: passthrough, one source per slice)."""
    return {"merge_method": "passthrough", "dtype": "float32",
            "slices": [{"sources": [{"model": str(models[s["model"]]), "layer_range": list(s["layers"])}]}
                       for s in slices]}
