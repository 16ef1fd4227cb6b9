"""The `hf_merge` space: merge coefficients of Hugging Face checkpoints, decoded into recipes.

A strategy sees a bounded vector; `decode` turns it into a recipe, a small JSON description
of one merged model: the method, its global parameters and, per tensor group (a block of
`layer_granularity` layers, split further by `filters`, plus embed / norm / head), one value
per expert for each searched parameter (mergekit's names: weight, density, gamma; t for
slerp). The recipe, not the vector, is what the run logs, so any evaluation can be rebuilt.

Workers call `open_runtime()` once: the base becomes their resident model (on their device),
experts and task vectors are memory-mapped from safetensors (shared by the workers of a
node through the page cache), and `materialize(recipe)` merges in place into the resident
model's parameters (`runtime.MergeRuntime`). The methods, their parameters and ranges are
`methods.METHODS`.
"""
from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import Field, model_validator

from ..errors import UserError
from ..memplan import MemoryConfig, Plan
from ..methods import GRADIENT_METHODS, METHODS, PARAMS, param_range
from ..schema import Frozen
from .merge_types import CheckpointSpace, Models, Range, cache_root, files_key, resolve_models

_DEFAULTS = ", ".join(f"{p.name} [{p.search[0]:g}, {p.search[1]:g}]" for p in PARAMS.values())
# the methods with mergekit's `normalize` (divide by the sum of weights)
_NORMALIZED = ("linear", "task_arithmetic", "ties", "dare_ties", "dare_linear", "breadcrumbs", "breadcrumbs_ties",
               "della", "della_linear")


class HFMergeSpaceConfig(Frozen):
    """Merge coefficients of Hugging Face checkpoints."""

    name: Literal["hf_merge"]
    models: Models = Field(description="the base and the experts (checkpoint directories, hub ids or LoRA adapters)")
    method: Literal[tuple(METHODS)] = Field("ties", description="merge method (mergekit semantics)")
    layer_granularity: int = Field(1, ge=0, description="layers per group of coefficients; 0: one global group")
    filters: tuple[str, ...] = Field((), description="substrings (e.g. attn, mlp) that split block groups")
    params: dict[str, float | Range] = Field(
        default_factory=dict,
        description="per-expert parameters: a number fixes it, {low, high} searches it; "
                    f"defaults {_DEFAULTS}")
    normalize: bool | None = Field(None, description="divide by the sum of weights; default mergekit's per method")
    options: dict[str, bool | int | float] = Field(
        default_factory=dict, description="the method's settings that are not searched, with mergekit's names "
                                          "and defaults (see the method catalog), e.g. {rescale: false} for della")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="dtype of the resident model; auto: the checkpoint's (config.json torch_dtype)")
    kernel: Literal["auto", "compiled", "eager"] = Field(
        "auto", description="per-candidate merge arithmetic: compiled (torch.compile, one fused pass per slice; "
                            "needs a C++ compiler on CPU; eager if compiling fails), eager (torch ops); auto: "
                            "compiled on a GPU, and on CPU for models of 10M+ parameters")
    delta_dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="dtype of the stored task vectors (expert - base); auto: each tensor's dtype in the "
                            "base checkpoint (bf16 models: bf16 deltas)")
    memory: MemoryConfig = Field(default_factory=MemoryConfig,
                                 description="where the worker keeps the merge inputs (see the memory plan)")
    device: str = Field("auto", description="resident model device: auto (cuda when the worker has a GPU), cpu, cuda")
    cache_dir: str | None = Field(None, description="where task vectors are stored once per model set "
                                                    "(default ~/.cache/evomerge/task_vectors)")

    @model_validator(mode="after")
    def _params_fit_method(self):
        entry = METHODS[self.method]
        allowed = entry.params
        for k, v in self.params.items():
            if k not in allowed:
                raise ValueError(f"params.{k}: method {self.method} takes "
                                 f"{', '.join(allowed) if allowed else 'no searched parameters'}")
            lo, hi = (v.low, v.high) if isinstance(v, Range) else (v, v)
            valid = param_range(self.method, k)[1]
            if valid is not None and ((valid[0] is not None and lo < valid[0]) or
                                      (valid[1] is not None and hi > valid[1])):
                raise ValueError(f"params.{k}: must lie in [{valid[0]}, {'inf' if valid[1] is None else valid[1]}]")
        defaults = dict(entry.options)
        for k, v in self.options.items():
            if k not in defaults:
                raise ValueError(f"options.{k}: method {self.method} takes "
                                 f"{', '.join(defaults) if defaults else 'no options'}")
            if type(v) is not type(defaults[k]) and not (isinstance(defaults[k], float) and type(v) is int):
                raise ValueError(f"options.{k}: a {type(defaults[k]).__name__} (default {defaults[k]!r})")
        if self.normalize is not None and self.method not in _NORMALIZED:
            raise ValueError(f"normalize: method {self.method} has no normalize setting")
        n, (least, most) = len(self.models.experts), entry.experts
        if METHODS[self.method].inputs == "slerp" and n != 1:
            raise ValueError("slerp merges the base with exactly one expert")
        if n < least or (most is not None and n > most):
            want = f"exactly {least}" if least == most else f"at least {least}" if most is None else f"{least}-{most}"
            raise ValueError(f"models.experts: method {self.method} merges {want} expert(s), got {n}")
        return self


def task_vector_dir(cfg: HFMergeSpaceConfig, base_path: Path, expert_paths: dict[str, Path]) -> Path:
    """Where this model set's task vectors (and magnitude tables) are written once: keyed by the delta dtype
    and the models' safetensors files."""
    files = [f for p in [base_path, *expert_paths.values()] for f in sorted(p.glob("*.safetensors"))]
    return cache_root(cfg.cache_dir) / files_key(f"deltas:{cfg.delta_dtype}", files)


class HFMergeSpace(CheckpointSpace):
    def __init__(self, cfg: HFMergeSpaceConfig, seed: int):
        from ..weights import group_of

        self.cfg = cfg
        self.seed = seed
        self.labels = list(cfg.models.experts)
        self.open_models(cfg.models)
        k = cfg.layer_granularity
        self.tensor_group = {
            n: ("all" if k == 0 else group_of(n, k, cfg.filters)) for n in self.base.names()}
        self.groups = sorted(set(self.tensor_group.values()), key=_group_order)
        searched, self.fixed = [], {}
        for p in METHODS[cfg.method].params:
            lo, hi = param_range(cfg.method, p)[0]
            v = cfg.params.get(p, Range(low=lo, high=hi))
            if isinstance(v, Range) and v.low < v.high:
                searched.append((p, v))
            else:
                self.fixed[p] = v.low if isinstance(v, Range) else float(v)
        self.options = {**dict(METHODS[cfg.method].options), **cfg.options}
        self.layout = [(g, p, e) for g in self.groups for p, _ in searched
                       for e in (self.labels[:self.per_group(p)])]
        ranges = {p: v for p, v in searched}
        self.lower = np.array([ranges[p].low for _, p, _ in self.layout], np.float64)
        self.upper = np.array([ranges[p].high for _, p, _ in self.layout], np.float64)
        self.dim = len(self.layout)
        if self.dim == 0:
            if not METHODS[cfg.method].params:
                raise UserError(f"space.method: {cfg.method} has no parameter to search (mergekit's {cfg.method} "
                                f"takes no value per model or tensor: it gives one model); search a method "
                                f"that has parameters (the README's method catalog)")
            raise UserError("space.params: every parameter is fixed: nothing to search")
        self.runtime = None

    def per_group(self, param: str) -> int:
        """Values of a parameter per group: one per expert, or one (a shared parameter: slerp's t, sce's
        select_topk)."""
        return 1 if PARAMS[param].shared else len(self.labels)

    # the vector <-> recipe ------------------------------------------------------------------
    def seeds(self) -> list[np.ndarray]:
        return [((self.lower + self.upper) / 2).astype(np.float32)]

    def decode(self, x: np.ndarray) -> dict:
        x = np.clip(np.asarray(x, np.float64), self.lower, self.upper)
        groups = {g: {p: [v] * self.per_group(p) for p, v in self.fixed.items()} for g in self.groups}
        for (g, p, e), v in zip(self.layout, x):
            groups[g].setdefault(p, []).append(round(float(v), 7))
        if "epsilon" in METHODS[self.cfg.method].params:  # DELLA: density -/+ epsilon must lie in (0, 1)
            for values in groups.values():
                values["epsilon"] = [e if d >= 1 else round(min(e, 0.999 * min(d, 1 - d)), 7)
                                     for d, e in zip(values["density"], values["epsilon"])]
        return self.recipe_of(groups)

    def recipe_of(self, groups: dict[str, dict[str, list[float]]], method: str | None = None) -> dict:
        """The recipe of these values per tensor group ({group: {param: one value per expert}}) over the
        space's experts and seed: merged by the space's method (and its normalize), or by `method` as given
        (without normalize)."""
        recipe = {"method": method or self.cfg.method, "experts": self.labels, "groups": groups, "seed": self.seed}
        if method is None and self.cfg.normalize is not None:
            recipe["normalize"] = self.cfg.normalize
        if method is None and self.options:
            recipe["options"] = dict(self.options)
        return recipe

    def describe(self) -> dict:
        return {"dim": self.dim, "method": self.cfg.method, "experts": self.labels, "groups": self.groups,
                "fixed": self.fixed, **({"options": self.options} if self.options else {}),
                "tensors": len(self.tensor_group),
                "layout": [f"{g}/{p}/{e}" + f" [{lo:g}, {hi:g}]" for (g, p, e), lo, hi
                           in zip(self.layout, self.lower, self.upper)]}

    def check_weight_gradient(self) -> None:
        """Refuse, before any evaluation, a space whose weights have no gradient here."""
        if self.cfg.method not in GRADIENT_METHODS:
            raise UserError(f"space.method: {self.cfg.method}: gradients with respect to the merge weights need "
                            f"{' or '.join(GRADIENT_METHODS)} (a merge linear in the weights)")

    def mergekit_config(self, recipe: dict) -> dict:
        """A mergekit YAML (as a dict) that reproduces the recipe's tensors with `mergekit-yaml`.

        Per-group values become per-tensor conditional parameters (`filter` = the full tensor
        name, which mergekit matches as a substring, first match wins).
        """
        entry = METHODS.get(recipe["method"])
        if entry is None or entry.mergekit is None:
            raise UserError(f"--mergekit: method {recipe['method']} has no mergekit equivalent")
        names = [n for n in self.base.names() if n in self.tensor_group]
        groups = recipe["groups"]

        def per_tensor(param: str, index: int):
            values = [{"filter": n, "value": groups[self.tensor_group[n]][param][index]} for n in names
                      if param in groups[self.tensor_group[n]]]
            distinct = {v["value"] for v in values}
            return values[0]["value"] if len(distinct) == 1 else values

        base = str(self.base_path)
        experts = [str(self.expert_paths[label]) for label in recipe["experts"]]
        cfg: dict = {"merge_method": entry.mergekit, "dtype": "float32"}
        if entry.inputs == "slerp":
            cfg["base_model"] = base
            cfg["models"] = [{"model": base}, {"model": experts[0]}]
            cfg["parameters"] = {"t": per_tensor("t", 0)}
            return cfg
        options = dict(recipe.get("options", {}))
        use_base = options.pop("use_base", True)
        present = {p for g in groups.values() for p in g}
        own = [p for p in PARAMS if p in present and not PARAMS[p].shared]
        shared = [p for p in entry.params if p in present and PARAMS[p].shared]
        cfg["models"] = [{"model": path, **({"parameters": {p: per_tensor(p, i) for p in own}} if own else {})}
                         for i, path in enumerate(experts)]
        if entry.task_vectors or (entry.kernel == "tensor" and use_base):
            cfg["base_model"] = base
        top = {p: per_tensor(p, 0) for p in shared}
        if "normalize" in recipe:
            top["normalize"] = recipe["normalize"]
        top.update(options)
        if top:
            cfg["parameters"] = top
        return cfg

    @classmethod
    def memory_plan(cls, cfg: HFMergeSpaceConfig, workers_per_node: int, gpu_share: float = 1.0,
                    measure_h2d: bool = True) -> Plan:
        """The plan of one worker of this space (its config), reading headers only; with task-vector
        methods, also whether the task-vector cache has room for the deltas."""
        from ..headers import model_tensors
        from ..memplan import cache_room, make_plan, plan_device

        base, experts = resolve_models(cfg.models)
        tensors = model_tensors(base)
        device, gpu_bytes = plan_device(cfg.device, cfg.memory)
        plan = make_plan(tensors, method=cfg.method, labels=list(cfg.models.experts), resident_dtype=cfg.dtype,
                         delta_dtype=cfg.delta_dtype, device=device, memory=cfg.memory, gpu_bytes=gpu_bytes,
                         gpu_share=gpu_share, workers_per_node=workers_per_node, measure_h2d=measure_h2d)
        entry = METHODS[cfg.method]
        if plan.fits and entry.task_vectors:
            root = Path(cfg.cache_dir).expanduser() if cfg.cache_dir else cache_root(None)
            why = cache_room(root, task_vector_dir(cfg, base, experts), list(experts), tensors, cfg.delta_dtype,
                             entry.by_magnitude)
            if why:
                plan = replace(plan, fits=False, why=why)
        return plan

    # worker side ------------------------------------------------------------------------------
    def new_runtime(self, device: str):
        from ..runtime import MergeRuntime

        return MergeRuntime(self, device)

    def task_vector_dir(self) -> Path:
        return task_vector_dir(self.cfg, self.base_path, self.expert_paths)

    def delta_dtype(self, name: str):
        """The stored task vector's dtype: space.delta_dtype, or (auto) the base checkpoint's dtype of the tensor."""
        from ..weights import torch_dtype

        if self.cfg.delta_dtype != "auto":
            return torch_dtype(self.cfg.delta_dtype)
        return self.base.tensor(name).dtype

    def prepare(self) -> Path:
        """Write once for this set of models (later runs reuse them), one tensor at a time: the task vectors
        (expert - base, computed in float32, stored in the delta dtype) and, for the methods that select by
        magnitude, each task vector's magnitude table (`kernels.MagnitudeTable`)."""
        import fcntl

        out = self.task_vector_dir()
        out.mkdir(parents=True, exist_ok=True)
        with open(out / ".lock", "a") as lock:  # the workers of a node: the first writes, the others wait for it
            fcntl.flock(lock, fcntl.LOCK_EX)
            self._prepare(out)
        return out

    def _prepare(self, out: Path) -> None:
        import torch

        from ..files import save_safetensors, write_safetensors
        from ..kernels import MagnitudeTable

        names = [n for n in self.base.names() if self.base.tensor(n).is_floating_point()]
        for label, ck in self.experts.items():
            target = out / f"{label}.safetensors"
            if not target.exists():
                def delta(name, ck=ck, label=label):
                    e = ck.tensor(name)
                    if not torch.isfinite(e).all():
                        raise UserError(f"space.models.experts.{label}: tensor {name} contains NaN or Inf")
                    return (e.float() - self.base.tensor(name).float()).to(self.delta_dtype(name))

                tmp = out / f".{label}.{os.getpid()}.tmp"
                try:
                    write_safetensors(tmp, [(n, tuple(self.base.tensor(n).shape), self.delta_dtype(n))
                                            for n in names], delta)
                    os.replace(tmp, target)
                finally:
                    tmp.unlink(missing_ok=True)
            stats = out / f"{label}.magnitudes.safetensors"
            if METHODS[self.cfg.method].by_magnitude and not stats.exists():
                from ..weights import _mapped

                deltas = _mapped(target)
                tables = {}
                for n in names:
                    tables.update(MagnitudeTable.of(deltas[n]).arrays(n))
                tmp = out / f".{label}.magnitudes.{os.getpid()}.tmp"
                save_safetensors(tables, tmp)
                os.replace(tmp, stats)


def _group_order(g: str):
    if g.startswith("layers."):
        head = g.split("/")[0][len("layers."):]
        return (1, int(head.split("-")[0]), g)
    return ({"embed": 0, "all": 0, "head": 3}.get(g, 2), 0, g)
