"""The `hf_merge` space: merge coefficients of Hugging Face checkpoints, decoded into recipes.

A strategy sees a bounded vector; `decode` turns it into a recipe, a small JSON description
of one merged model: the method, its global parameters and, per tensor group (a block of
`layer_granularity` layers, split further by `filters`, plus embed / norm / head), one value
per expert for each searched parameter (mergekit's names: weight, density, gamma; t for
slerp). The recipe, not the vector, is what the run logs, so any evaluation can be rebuilt.

Workers call `open_runtime()` once: the base becomes their resident model (on their device),
experts and task vectors are memory-mapped from safetensors (shared by the workers of a
node through the page cache), and `materialize(recipe)` merges in place into the resident
model's parameters.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import Field, model_validator

from ..errors import UserError
from ..files import save_pretrained, save_safetensors
from ..memplan import MemoryConfig
from ..schema import Frozen
from .base import SearchSpace

# searched (per expert) parameters of each method, in mergekit's names
METHOD_PARAMS = {
    "linear": ("weight",),
    "task_arithmetic": ("weight",),
    "ties": ("weight", "density"),
    "dare_ties": ("weight", "density"),
    "dare_linear": ("weight", "density"),
    "breadcrumbs": ("weight", "density", "gamma"),
    "breadcrumbs_ties": ("weight", "density", "gamma"),
    "slerp": ("t",),
}
GRADIENT_METHODS = ("task_arithmetic", "linear")  # merged tensors linear in the weights
BAND_METHODS = ("ties", "breadcrumbs", "breadcrumbs_ties")  # select task-vector entries by magnitude
DEFAULT_RANGES = {"weight": (0.0, 1.0), "density": (0.1, 1.0), "gamma": (0.0, 0.05), "t": (0.0, 1.0)}
VALID = {"density": (1e-6, 1.0), "gamma": (0.0, 1.0), "t": (0.0, 1.0)}


class Range(Frozen):
    """A searched interval: the strategy's bounds for this parameter."""

    low: float = Field(description="lower bound (inclusive)")
    high: float = Field(description="upper bound (inclusive; equal to low fixes the value)")

    @model_validator(mode="after")
    def _ordered(self):
        if self.low > self.high:
            raise ValueError(f"low {self.low} is above high {self.high}")
        return self


class Models(Frozen):
    """The seed checkpoints: a base and labelled experts (full checkpoints or LoRA adapters of the base)."""

    base: str = Field(description="base model: a local directory or a hub id")
    experts: dict[str, str] = Field(description="label -> fine-tuned model (local directory or hub id)")

    @model_validator(mode="after")
    def _some(self):
        if not self.experts:
            raise ValueError("name at least one expert")
        return self


class HFMergeSpaceConfig(Frozen):
    """Merge coefficients of Hugging Face checkpoints."""

    name: Literal["hf_merge"]
    models: Models = Field(description="the base and the experts (checkpoint directories, hub ids or LoRA adapters)")
    method: Literal[tuple(METHOD_PARAMS)] = Field("ties", description="merge method (mergekit semantics)")
    layer_granularity: int = Field(1, ge=0, description="layers per group of coefficients; 0: one global group")
    filters: tuple[str, ...] = Field((), description="substrings (e.g. attn, mlp) that split block groups")
    params: dict[str, float | Range] = Field(
        default_factory=dict,
        description="per-expert parameters: a number fixes it, {low, high} searches it; "
                    "defaults weight [0, 1], density [0.1, 1], gamma [0, 0.05], t [0, 1]")
    normalize: bool | None = Field(None, description="divide by the sum of weights; default mergekit's per method")
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
        allowed = METHOD_PARAMS[self.method]
        for k, v in self.params.items():
            if k not in allowed:
                raise ValueError(f"params.{k}: method {self.method} takes {', '.join(allowed)}")
            lo, hi = (v.low, v.high) if isinstance(v, Range) else (v, v)
            if k in VALID and (lo < VALID[k][0] or hi > VALID[k][1]):
                raise ValueError(f"params.{k}: must lie in [{VALID[k][0]}, {VALID[k][1]}]")
        if self.method == "slerp" and len(self.models.experts) != 1:
            raise ValueError("slerp merges the base with exactly one expert")
        return self


def resolve_model(ref: str, what: str) -> Path:
    """A local directory, or a hub id resolved through the local hub cache / a download."""
    p = Path(ref).expanduser()
    if p.is_dir():
        return p
    if p.exists() or ref.startswith((".", "/", "~")):
        raise UserError(f"space.models.{what}: {ref}: not a model directory")
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(ref, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt"]))
    except Exception as e:  # noqa: BLE001 - any hub failure is the user's model reference
        hint = ""
        if ref.startswith("zoo/"):
            from ..command import prog

            name = ref.split("/")[1]
            hint = f"; build the demo models first: {prog('zoo')} {name} --out zoo/{name}"
        raise UserError(f"space.models.{what}: {ref}: not a local directory and not loadable from the hub "
                        f"({type(e).__name__}){hint}") from None


class HFMergeSpace(SearchSpace):
    def __init__(self, cfg: HFMergeSpaceConfig, seed: int):
        from ..weights import Checkpoint, check_compatible, group_of, open_expert

        self.cfg = cfg
        self.seed = seed
        self.labels = list(cfg.models.experts)
        self.base_path = resolve_model(cfg.models.base, "base")
        self.expert_paths = {k: resolve_model(v, f"experts.{k}") for k, v in cfg.models.experts.items()}
        self.base = Checkpoint.open(self.base_path)
        self.experts = {k: open_expert(p, self.base) for k, p in self.expert_paths.items()}
        check_compatible(self.base, self.experts)
        k = cfg.layer_granularity
        self.tensor_group = {
            n: ("all" if k == 0 else group_of(n, k, cfg.filters)) for n in self.base.names()}
        self.groups = sorted(set(self.tensor_group.values()), key=_group_order)
        searched, self.fixed = [], {}
        for p in METHOD_PARAMS[cfg.method]:
            v = cfg.params.get(p, Range(low=DEFAULT_RANGES[p][0], high=DEFAULT_RANGES[p][1]))
            if isinstance(v, Range) and v.low < v.high:
                searched.append((p, v))
            else:
                self.fixed[p] = v.low if isinstance(v, Range) else float(v)
        per = 1 if cfg.method == "slerp" else len(self.labels)
        self.layout = [(g, p, e) for g in self.groups for p, _ in searched
                       for e in (self.labels[:per])]
        ranges = {p: v for p, v in searched}
        self.lower = np.array([ranges[p].low for _, p, _ in self.layout], np.float64)
        self.upper = np.array([ranges[p].high for _, p, _ in self.layout], np.float64)
        self.dim = len(self.layout)
        if self.dim == 0:
            raise UserError("space.params: every parameter is fixed: nothing to search")
        self.runtime = None

    # the vector <-> recipe ------------------------------------------------------------------
    def seeds(self) -> list[np.ndarray]:
        return [((self.lower + self.upper) / 2).astype(np.float32)]

    def decode(self, x: np.ndarray) -> dict:
        x = np.clip(np.asarray(x, np.float64), self.lower, self.upper)
        n = 1 if self.cfg.method == "slerp" else len(self.labels)
        groups = {g: {p: [v] * n for p, v in self.fixed.items()} for g in self.groups}
        for (g, p, e), v in zip(self.layout, x):
            groups[g].setdefault(p, []).append(round(float(v), 7))
        return self.recipe_of(groups)

    def recipe_of(self, groups: dict[str, dict[str, list[float]]], method: str | None = None) -> dict:
        """The recipe of these values per tensor group ({group: {param: one value per expert}}) over the
        space's experts and seed: merged by the space's method (and its normalize), or by `method` as given
        (without normalize)."""
        recipe = {"method": method or self.cfg.method, "experts": self.labels, "groups": groups, "seed": self.seed}
        if method is None and self.cfg.normalize is not None:
            recipe["normalize"] = self.cfg.normalize
        return recipe

    def recipe(self, x: np.ndarray) -> dict:
        return self.decode(x)

    def describe(self) -> dict:
        return {"dim": self.dim, "method": self.cfg.method, "experts": self.labels, "groups": self.groups,
                "fixed": self.fixed, "tensors": len(self.tensor_group),
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
        from ..methods import METHODS

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
        params = [p for p in ("weight", "density", "gamma") if any(p in g for g in groups.values())]
        cfg["models"] = [{"model": path, "parameters": {p: per_tensor(p, i) for p in params}}
                         for i, path in enumerate(experts)]
        if entry.task_vectors:
            cfg["base_model"] = base
        if "normalize" in recipe:
            cfg["parameters"] = {"normalize": recipe["normalize"]}
        return cfg

    # worker side ------------------------------------------------------------------------------
    def open_runtime(self, device: str | None = None) -> "MergeRuntime":
        if self.runtime is None:
            self.runtime = MergeRuntime(self, device or self.cfg.device)
        return self.runtime

    def materialize(self, recipe: dict):
        return self.open_runtime().materialize(recipe)

    def save(self, x: np.ndarray, directory: Path, info: dict) -> None:
        save_point(self, x, directory, info)

    def task_vector_dir(self) -> Path:
        key = hashlib.sha256(f"deltas:{self.cfg.delta_dtype}".encode())
        for p in [self.base_path, *self.expert_paths.values()]:
            for f in sorted(p.glob("*.safetensors")):
                st = f.stat()
                key.update(f"{f.resolve()}:{st.st_size}:{st.st_mtime_ns}".encode())
        root = Path(self.cfg.cache_dir or Path.home() / ".cache" / "evomerge" / "task_vectors")
        return root / key.hexdigest()[:16]

    def delta_dtype(self, name: str):
        """The stored task vector's dtype: space.delta_dtype, or (auto) the base checkpoint's dtype of the tensor."""
        import torch

        if self.cfg.delta_dtype != "auto":
            return getattr(torch, self.cfg.delta_dtype)
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

        from ..files import write_safetensors
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
            if self.cfg.method in BAND_METHODS and not stats.exists():
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


class ResidentModel:
    """A worker's resident model, loaded once from `path` onto `device` (auto: cuda when there is
    one); `targets` maps tensor names to its parameters and buffers (tied weights appear once),
    into which each candidate is written in place."""

    def __init__(self, path: Path, names: list[str], dtype: str, device: str):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        hf_logging.set_verbosity_error()
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        self.model = AutoModelForCausalLM.from_pretrained(
            path, dtype="auto" if dtype == "auto" else getattr(torch, dtype)).to(self.device).eval()
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        state = dict(self.model.named_parameters())
        state.update(dict(self.model.named_buffers()))
        self.targets = {n: state[n] for n in names if n in state}

    def save(self, directory: Path) -> None:
        save_pretrained(self.model, self.tokenizer, directory)


def save_point(space, x: np.ndarray, directory: Path, info: dict) -> None:
    """A recipe space's point x as a model directory, with recipe.json and info.json beside it."""
    rt = space.open_runtime()
    recipe = space.decode(x)
    rt.materialize(recipe)
    rt.save(directory)
    (Path(directory) / "recipe.json").write_text(json.dumps(recipe, indent=2) + "\n")
    (Path(directory) / "info.json").write_text(json.dumps(info, indent=2) + "\n")


def auto_compiled(device: str, method: str, params: int) -> bool:
    """kernel: auto. On CPU a compile (~5-30 s once per worker) pays for itself on models of 10M+ parameters
    (bench/merge_throughput.py, ~100M parameters, 3 experts: TIES 0.13 s compiled vs 4-5 s eager,
    linear 0.10 s vs 0.13 s); tiny models merge eagerly."""
    import shutil

    if device == "cuda":
        return True
    return params >= 10_000_000 and shutil.which("g++") is not None


class MergeRuntime(ResidentModel):
    """A worker's resident model and the merge inputs, placed by the worker's memory plan (`inputs.py`).

    A candidate is one pass over every merged tensor in slices (`kernels.py`): candidate-independent
    statistics (magnitude tables, slerp's cosines) were computed once, so each slice is elementwise
    arithmetic, compiled into one fused kernel (`space.kernel`) or run eagerly.
    """

    def __init__(self, space: HFMergeSpace, device: str):
        import torch

        from ..inputs import MergeInputs
        from ..kernels import MagnitudeTable, Merger, slerp_stats, spec_for
        from ..memplan import make_plan
        from ..weights import _mapped

        super().__init__(space.base_path, space.base.names(), space.cfg.dtype, device)
        self.space = space
        cfg = space.cfg
        method, labels = cfg.method, space.labels
        self.floats = [n for n, t in self.targets.items() if t.is_floating_point()]
        tv_dir = space.prepare() if method not in ("linear", "slerp") else None
        sources, kinds = {}, {}
        for n in self.floats:
            if method == "linear":
                sources[n] = [space.experts[lbl].tensor(n) for lbl in labels]
                kinds[n] = [("expert", lbl) for lbl in labels]
            elif method == "slerp":
                sources[n] = [space.base.tensor(n), space.experts[labels[0]].tensor(n)]
                kinds[n] = [("base", "base"), ("expert", labels[0])]
            else:
                tvs = [_mapped(tv_dir / f"{lbl}.safetensors") for lbl in labels]
                sources[n] = [space.base.tensor(n), *[tv[n] for tv in tvs]]
                kinds[n] = [("base", "base"), *[("delta", lbl) for lbl in labels]]
        self.sources = sources
        gpu_bytes = torch.cuda.get_device_properties(self.device).total_memory if self.device.type == "cuda" else None
        shapes = space.base.slices()
        self.plan = make_plan(shapes, method=method, labels=labels, resident_dtype=str(self.model.dtype)[6:],
                              delta_dtype=cfg.delta_dtype, device=self.device.type, memory=cfg.memory,
                              gpu_bytes=gpu_bytes, gpu_share=getattr(space, "gpu_share", 1.0), measure_h2d=False)
        if not self.plan.fits:
            raise UserError(self.plan.why)
        tiers = {n: [self.plan.tier(kind, label, n) for kind, label in kinds[n]] for n in self.floats}
        self.inputs = MergeInputs(sources, tiers, self.device, cfg.memory.slice_mib << 20)
        tables = {}
        if method in BAND_METHODS:
            stats = [_mapped(tv_dir / f"{lbl}.magnitudes.safetensors") for lbl in labels]
            tables = {n: [MagnitudeTable.load(st, n, sources[n][0].numel()) for st in stats] for n in self.floats}
        compiled = cfg.kernel == "compiled" or (cfg.kernel == "auto" and auto_compiled(
            self.device.type, method, sum(t.numel() for t in self.targets.values())))
        self.merger = Merger(spec_for(method, 1 if method == "slerp" else len(labels), cfg.normalize), self.device,
                             tables, {n: slerp_stats(*sources[n]) for n in self.floats} if method == "slerp" else {},
                             compiled)
        if compiled:  # compile now (seconds to tens of seconds), not inside the first candidate's merge_s
            self.materialize(space.decode(space.seeds()[0]))
        self.last_transfer_s = None

    def materialize(self, recipe: dict):
        """Merge the recipe into the resident model's parameters, in place."""
        groups = {n: recipe["groups"][self.space.tensor_group[n]] for n in self.floats}
        outs = {n: self.targets[n].data.view(-1) for n in self.floats}  # targets may be re-pointed (tests)
        self.merger.run(self.inputs, outs, groups, recipe.get("seed", 0))
        self.last_transfer_s = self.inputs.transfer_s
        return self.model

    def weight_gradient(self, recipe: dict, loss_fn, materialized: bool = False) -> tuple[float, dict[str, list[float]]]:
        """(loss, {group: d loss / d weight per expert}) at the recipe's merge, for the methods whose
        merged tensor is linear in the weights (task_arithmetic, linear; normalized or not).
        `materialized`: the resident model already holds this recipe's merge.

        One backward pass through the resident model gives G = d loss / d W per tensor; the merged
        W = c + sum_k w_k X_k (X = task vectors, or the experts for linear) so d loss / d w_k = <G, X_k>,
        divided form (normalize): W = c + sum_k w_k X_k / sum_k w_k gives (<G, X_k> - <G, W - c>) / sum_k w_k.
        """
        import torch

        method = recipe["method"]
        if method not in GRADIENT_METHODS:
            raise ValueError(f"weight gradients need method {' or '.join(GRADIENT_METHODS)}, not {method}")
        normalize = recipe.get("normalize")
        normalize = (method == "linear") if normalize is None else normalize
        model = self.model if materialized else self.materialize(recipe)
        params = [p for p in self.targets.values() if isinstance(p, torch.nn.Parameter)]
        flags = [p.requires_grad for p in params]
        try:
            for p in params:
                p.requires_grad_(True)
                p.grad = None
            with torch.enable_grad():
                loss = loss_fn(model)
                loss.backward()
            out = {g: [0.0] * len(recipe["experts"]) for g in recipe["groups"]}
            with torch.no_grad():
                for name, p in self.targets.items():
                    if getattr(p, "grad", None) is None:
                        continue
                    g = self.space.tensor_group[name]
                    grad = p.grad.float().reshape(-1)
                    xs = self.sources[name] if method == "linear" else self.sources[name][1:]
                    dots = [float(torch.dot(grad, x.float().reshape(-1).to(grad.device))) for x in xs]
                    if normalize:
                        w = recipe["groups"][g]["weight"]
                        total = float(sum(w))
                        merged = p.float().reshape(-1)
                        if method != "linear":
                            merged = merged - self.sources[name][0].float().reshape(-1).to(grad.device)
                        gm = float(torch.dot(grad, merged))
                        dots = [(d - gm) / total if total else 0.0 for d in dots]
                    for k, d in enumerate(dots):
                        out[g][k] += d
            return float(loss.detach()), out
        finally:
            for p, f in zip(params, flags):
                p.grad = None
                p.requires_grad_(f)
