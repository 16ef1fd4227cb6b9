"""The `hf_layers` space: the layer path itself (data-flow merging, Akiba et al. 2024, "data flow space").

The merged model runs a sequence of transformer layers drawn from the seed models (the base and the
experts, or the experts alone), repeats included. As in the paper, the vector is an inclusion indicator
over a fixed budget of slots: the layers of every seed model in order, the whole sequence `repeats`
times (T = repeats x models x layers; slot t is layer t mod L of model (t // L) mod M), and a slot whose
entry is > 0 is in the path, in slot order. With `scales: true`, one searched factor per slot multiplies
the hidden state entering its layer when the path jumps there from another model (the paper's W is a
matrix over model pairs; one factor per slot is as expressive per jump and keeps the vector flat).

Each slot's indicator range is [-1.5, 0.5] or, for the first seed model's slots of the first repeat,
[-0.5, 1.5]: every range is 2 wide and the centre of the space is the first model's own path (so
`x0: center` starts there). A point that includes no slot decodes to its largest entry's slot alone.

Workers load each seed model once and build a candidate's model over their resident layer modules,
copying no weight (`layerpath.PathRuntime`). The recipe:
{"method": "layers", "path": [{"model": label, "layer": i, "scale": s (jumps, scales: true)}, ...]}.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import Field, model_validator

from ..errors import UserError
from ..schema import Frozen
from .merge_types import CheckpointSpace, Models, Range


class HFLayersSpaceConfig(Frozen):
    """A layer path through the seed models (data-flow merging)."""

    name: Literal["hf_layers"]
    models: Models = Field(description="the base and the experts (full checkpoints of one architecture; a model "
                                       "may be a finished run's directory: its best/ model, for PS+DFS); the "
                                       "base's config and tokenizer are the path model's")
    include_base: bool = Field(True, description="the base's layers are slots too (seed models: base + experts); "
                                                 "false: the experts' only")
    repeats: int = Field(2, ge=1, le=16, description="times the seed models' layer sequence repeats in the slot "
                                                     "budget (the paper's r): T = repeats x models x layers slots")
    scales: bool = Field(False, description="search one factor per slot on the hidden state entering its layer "
                                            "where the path jumps from another model")
    scale_range: Range = Field(default_factory=lambda: Range(low=0.5, high=1.5),
                               description="the searched range of a jump's scale (scales: true)")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="dtype of the resident seed models; auto: the checkpoints'")
    device: str = Field("auto", description="resident models' device: auto (cuda when the worker has a GPU), cpu, "
                                            "cuda")

    @model_validator(mode="after")
    def _labels(self):
        if self.include_base and "base" in self.models.experts:
            raise ValueError("models.experts.base: the label 'base' is taken by include_base: true")
        if self.scales and self.scale_range.low <= 0:
            raise ValueError(f"scale_range.low: {self.scale_range.low:g}: a scale must be above 0")
        return self


@dataclass(frozen=True)
class SeedModelsPlan:
    """A worker of an `hf_layers` space holds every seed model resident on its device (a path runs their layer
    modules directly): their bytes in the resident dtype against the device's budget (90% of the GPU less a
    reserve of 10%, at least 1 GiB, times the worker's share of it; unlimited on CPU)."""

    device: str
    gpu_bytes: int | None
    budget: int | None
    reserve: int
    per_model: tuple[tuple[str, int], ...]
    fits: bool
    why: str

    def lines(self) -> list[str]:
        from ..memplan import gib

        total = sum(b for _, b in self.per_model)
        where = "its GPU" if self.device == "cuda" else "the CPU"
        out = [f"memory plan ({where}, per worker): {len(self.per_model)} seed models resident, {gib(total)} "
               f"({', '.join(f'{k} {gib(b)}' for k, b in self.per_model)})"]
        if self.budget is not None:
            gpu = f" of a {gib(self.gpu_bytes)} GPU" if self.gpu_bytes else ""
            out.append(f"  budget {gib(self.budget)}{gpu}, reserve {gib(self.reserve)}")
        out.append("  fits" if self.fits else f"  does not fit: {self.why}")
        return out


class HFLayersSpace(CheckpointSpace):
    @classmethod
    def memory_plan(cls, cfg: HFLayersSpaceConfig, workers_per_node: int, gpu_share: float = 1.0,
                    measure_h2d: bool = True) -> SeedModelsPlan:
        """Every seed model resident on the worker's device, from the checkpoints' headers (no weights read)."""
        from ..headers import FLOATING, model_tensors, nbytes
        from ..memplan import GIB, MemoryConfig, gib, plan_device, st_dtype
        from .merge_types import resolve_models

        base, experts = resolve_models(cfg.models)
        paths = ({"base": base} if cfg.include_base else {}) | experts
        dt = st_dtype(cfg.dtype)
        per = tuple((label, sum(nbytes(shape, dt if (dt and d in FLOATING) else d)
                                for shape, d in model_tensors(p).values())) for label, p in paths.items())
        device, gpu_bytes = plan_device(cfg.device, MemoryConfig())
        budget = int(0.9 * gpu_bytes * gpu_share) if device == "cuda" and gpu_bytes else None
        reserve = max(GIB, int(0.1 * gpu_bytes * gpu_share)) if budget is not None else 0
        total = sum(b for _, b in per)
        fits = budget is None or total + reserve <= budget
        why = "" if fits else (f"space.models: the {len(per)} seed models ({gib(total)}) and the reserve "
                               f"({gib(reserve)}) do not fit in the worker's budget ({gib(budget)} of a "
                               f"{gib(gpu_bytes)} GPU); use fewer seed models (include_base: false), a 16-bit "
                               f"space.dtype, or a GPU with more memory")
        return SeedModelsPlan(device, gpu_bytes, budget, reserve, per, fits, why)

    def __init__(self, cfg: HFLayersSpaceConfig, seed: int):
        from ..layerpath import slots
        from ..weights import layer_index

        self.cfg = cfg
        self.seed = seed
        self.open_models(cfg.models)
        from ..weights import Checkpoint

        for label, ck in self.experts.items():
            if not isinstance(ck, Checkpoint):
                raise UserError(f"space.models.experts.{label}: a LoRA adapter has no layers of its own; a layer "
                                "path needs full checkpoints")
        self.seed_paths = {**({"base": self.base_path} if cfg.include_base else {}), **self.expert_paths}
        self.labels = list(self.seed_paths)
        self.depth = 1 + max((i for i in map(layer_index, self.base.names()) if i is not None), default=-1)
        if self.depth < 1:
            raise UserError(f"space.models.base: {self.base_path}: no transformer layers found")
        self.slots = slots(self.labels, self.depth, cfg.repeats)
        n = len(self.slots)
        first = np.arange(n) < self.depth  # the first model's slots of the first repeat
        self.lower = np.where(first, -0.5, -1.5)
        self.upper = np.where(first, 1.5, 0.5)
        if cfg.scales:
            self.lower = np.concatenate([self.lower, np.full(n, cfg.scale_range.low)])
            self.upper = np.concatenate([self.upper, np.full(n, cfg.scale_range.high)])
        self.dim = len(self.lower)
        self.layout = [(f"slot.{t}", "include", f"{m}.{i}") for t, (m, i) in enumerate(self.slots)]
        if cfg.scales:
            self.layout += [(f"slot.{t}", "scale", f"{m}.{i}") for t, (m, i) in enumerate(self.slots)]
        self.runtime = None

    def seeds(self) -> list[np.ndarray]:
        """Each seed model's own path (its slots of the first repeat in, every other out; scales 1)."""
        n, out = len(self.slots), []
        for k in range(len(self.labels)):
            x = np.full(n, -0.5)
            x[k * self.depth:(k + 1) * self.depth] = 0.5
            if self.cfg.scales:
                x = np.concatenate([x, np.clip(np.ones(n), self.cfg.scale_range.low, self.cfg.scale_range.high)])
            out.append(np.clip(x, self.lower, self.upper).astype(np.float32))
        return out

    def decode(self, x: np.ndarray) -> dict:
        x = np.clip(np.asarray(x, np.float64), self.lower, self.upper)
        n = len(self.slots)
        on = np.flatnonzero(x[:n] > 0)
        if not len(on):
            on = [int(np.argmax(x[:n]))]
        path, prev = [], None
        for t in on:
            label, layer = self.slots[t]
            step = {"model": label, "layer": layer}
            if self.cfg.scales and prev is not None and prev != label:
                step["scale"] = round(float(x[n + t]), 6)
            path.append(step)
            prev = label
        return {"method": "layers", "path": path}

    def describe(self) -> dict:
        centre = self.decode((self.lower + self.upper) / 2)["path"]
        return {"dim": self.dim, "seed_models": self.labels, "layers_per_model": self.depth,
                "repeats": self.cfg.repeats, "slots": len(self.slots), "scales": self.cfg.scales,
                "path_at_centre": " ".join(f"{s['model']}.{s['layer']}" for s in centre),
                "layout": [f"{g}/{p}/{e} [{lo:g}, {hi:g}]" for (g, p, e), lo, hi
                           in zip(self.layout, self.lower, self.upper)]}

    def mergekit_config(self, recipe: dict) -> dict:
        """mergekit's passthrough: one slice per run of consecutive layers of one model; a scaled path has none."""
        from ..layerpath import scaled, slices_of
        from ..passthrough import mergekit_passthrough

        if scaled(recipe["path"]):
            raise UserError("--mergekit: this path scales the input of a layer where it jumps between models; "
                            "mergekit's passthrough scales whole tensors (`scale`), not a layer's input: "
                            "export it with --to, or search with space.scales: false")
        return mergekit_passthrough(self.seed_paths, slices_of(recipe["path"]))

    # worker side ------------------------------------------------------------------------------
    def new_runtime(self, device: str):
        from ..layerpath import PathRuntime

        return PathRuntime(self.seed_paths, self.cfg.dtype, device)

    def save(self, x: np.ndarray, directory: Path, info: dict) -> None:
        from ..layerpath import save_path

        recipe = self.decode(x)
        directory = Path(directory)
        save_path(self.seed_paths, recipe["path"], directory)
        (directory / "recipe.json").write_text(json.dumps(recipe, indent=2) + "\n")
        (directory / "info.json").write_text(json.dumps(info, indent=2) + "\n")
