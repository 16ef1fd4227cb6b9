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

from .errors import UserError
from .files import save_pretrained, save_safetensors
from .schema import Frozen
from .space import SearchSpace

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
    dtype: Literal["float32", "bfloat16", "float16"] = Field("float32", description="dtype of the resident model")
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
            from .cli import prog

            name = ref.split("/")[1]
            hint = f"; build the demo models first: {prog('zoo')} {name} --out zoo/{name}"
        raise UserError(f"space.models.{what}: {ref}: not a local directory and not loadable from the hub "
                        f"({type(e).__name__}){hint}") from None


class HFMergeSpace(SearchSpace):
    def __init__(self, cfg: HFMergeSpaceConfig, seed: int):
        from .pool import Checkpoint, check_compatible, group_of, open_expert

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
        recipe = {"method": self.cfg.method, "experts": self.labels, "groups": groups, "seed": self.seed}
        if self.cfg.normalize is not None:
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
        key = hashlib.sha256()
        for p in [self.base_path, *self.expert_paths.values()]:
            for f in sorted(p.glob("*.safetensors")):
                st = f.stat()
                key.update(f"{f.resolve()}:{st.st_size}:{st.st_mtime_ns}".encode())
        root = Path(self.cfg.cache_dir or Path.home() / ".cache" / "evomerge" / "task_vectors")
        return root / key.hexdigest()[:16]

    def prepare(self) -> Path:
        """Write the task vectors (expert - base) once for this set of models; later runs reuse them."""
        import torch

        out = self.task_vector_dir()
        out.mkdir(parents=True, exist_ok=True)
        for label, ck in self.experts.items():
            target = out / f"{label}.safetensors"
            if target.exists():
                continue
            tensors = {}
            for name in self.base.names():
                b = self.base.tensor(name)
                if not b.is_floating_point():
                    continue
                e = ck.tensor(name)
                if not torch.isfinite(e).all():
                    raise UserError(f"space.models.experts.{label}: tensor {name} contains NaN or Inf")
                tensors[name] = (e.float() - b.float()).contiguous()
            tmp = out / f".{label}.{os.getpid()}.tmp"
            save_safetensors(tensors, tmp)
            os.replace(tmp, target)
        return out


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
        self.model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype)).to(self.device).eval()
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


class MergeRuntime(ResidentModel):
    """A worker's resident model and the memory-mapped inputs it merges from."""

    def __init__(self, space: HFMergeSpace, device: str):
        super().__init__(space.base_path, space.base.names(), space.cfg.dtype, device)
        self.space = space
        from .pool import Checkpoint

        tv_dir = space.prepare()
        # base, experts and task vectors: zero-copy views of memory-mapped files on CPU (one copy in
        # the page cache for all workers of a node), copied once to the device when it is a GPU
        self._cache_gpu = self.device.type == "cuda"
        tvs = [Checkpoint(tv_dir, {n: tv_dir / f"{label}.safetensors" for n in self.targets})
               for label in space.labels]
        self._base, self._deltas, self._experts = {}, {}, {}
        for n in self.targets:
            self._base[n] = self._to(space.base.tensor(n))
            if self.targets[n].is_floating_point():
                self._deltas[n] = [self._to(tv.tensor(n)) for tv in tvs]

    def _to(self, t):
        return t.to(self.device, non_blocking=True) if self._cache_gpu else t

    def _expert(self, label: str, name: str):
        key = (label, name)
        if key not in self._experts:
            self._experts[key] = self._to(self.space.experts[label].tensor(name))
        return self._experts[key]

    def materialize(self, recipe: dict):
        """Merge the recipe into the resident model's parameters, in place."""
        import torch

        from .merge import merge_tensor

        method, labels = recipe["method"], recipe["experts"]
        normalize = recipe.get("normalize")
        with torch.no_grad():
            for name, out in self.targets.items():
                if not out.is_floating_point():
                    continue
                p = recipe["groups"][self.space.tensor_group[name]]
                base = self._base[name].to(torch.float32)
                kw = dict(weights=p.get("weight"), density=p.get("density"), gamma=p.get("gamma"),
                          normalize=normalize, seed=recipe.get("seed", 0))
                if method == "slerp":
                    experts, kw = [self._expert(labels[0], name).float()], {"t": p["t"][0]}
                elif method == "linear":
                    experts = [self._expert(lbl, name).float() for lbl in labels]
                else:  # task-vector methods read the precomputed deltas (the list only gives the count)
                    experts = kw["deltas"] = self._deltas[name]
                if out.dtype == torch.float32:
                    merge_tensor(method, name, base, experts, out, **kw)
                else:
                    tmp = torch.empty_like(base)
                    merge_tensor(method, name, base, experts, tmp, **kw)
                    out.copy_(tmp)
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
                    xs = ([self._expert(lbl, name) for lbl in recipe["experts"]] if method == "linear"
                          else self._deltas[name])
                    dots = [float(torch.dot(grad, x.float().reshape(-1).to(grad.device))) for x in xs]
                    if normalize:
                        w = recipe["groups"][g]["weight"]
                        total = float(sum(w))
                        merged = p.float().reshape(-1)
                        if method != "linear":
                            merged = merged - self._base[name].float().reshape(-1).to(grad.device)
                        gm = float(torch.dot(grad, merged))
                        dots = [(d - gm) / total if total else 0.0 for d in dots]
                    for k, d in enumerate(dots):
                        out[g][k] += d
            return float(loss.detach()), out
        finally:
            for p, f in zip(params, flags):
                p.grad = None
                p.requires_grad_(f)
