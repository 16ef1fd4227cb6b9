"""A worker's resident model: the one model a merging worker loads, into which every candidate is
written in place, and the merge runtime of the `hf_merge` space.

`ResidentModel` declares what the worker reads of any space's runtime (`device`, `tokenizer`,
`last_transfer_s`, `materialize(recipe)`, `weight_gradient(...)`); `MergeRuntime` places the merge
inputs by the worker's memory plan (`inputs.py`) and merges each candidate in one pass over its
tensors (`kernels.py`). torch and transformers are imported when a runtime is made, not with this module.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path

from .errors import UserError
from .files import save_pretrained
from .methods import GRADIENT_METHODS, METHODS


class ResidentModel(ABC):
    """A worker's resident model, loaded once from `path` onto `device` (auto: cuda when there is
    one): `model` (the transformers model, in eval mode), its `tokenizer`, the torch `device`, and
    `targets`, tensor names -> its parameters and buffers (tied weights appear once), into which each
    candidate is written in place. `last_transfer_s`: the copy engine's seconds streaming merge inputs
    for the last candidate (None when nothing streamed)."""

    last_transfer_s: float | None = None

    def __init__(self, path: Path, names: list[str], dtype: str, device: str):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer
        from transformers.utils import logging as hf_logging

        from .weights import torch_dtype

        hf_logging.disable_progress_bar()
        hf_logging.set_verbosity_error()
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        self.model = AutoModelForCausalLM.from_pretrained(
            path, dtype="auto" if dtype == "auto" else torch_dtype(dtype)).to(self.device).eval()
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        state = dict(self.model.named_parameters())
        state.update(dict(self.model.named_buffers()))
        self.targets = {n: state[n] for n in names if n in state}

    @abstractmethod
    def materialize(self, recipe: dict):
        """Write the recipe's model into the resident model's tensors, in place; returns the model."""

    def weight_gradient(self, recipe: dict, loss_fn,
                        materialized: bool = False) -> tuple[float, dict[str, list[float]]]:
        """(loss, {group: d loss / d weight per expert}) at the recipe's merge (see `MergeRuntime`); a runtime
        whose merge has no such gradient refuses."""
        raise ValueError(f"weight gradients need an hf_merge space with method {' or '.join(GRADIENT_METHODS)}")

    def save(self, directory: Path) -> None:
        save_pretrained(self.model, self.tokenizer, directory)


def auto_compiled(device: str, method: str, params: int) -> bool:
    """kernel: auto. On CPU a compile (~5-30 s once per worker) pays for itself on models of 10M+ parameters
    (bench/merge_throughput.py, ~100M parameters, 3 experts: TIES 0.13 s compiled vs 4-5 s eager,
    linear 0.10 s vs 0.13 s); tiny models merge eagerly."""
    import shutil

    if device == "cuda":
        return True
    return params >= 10_000_000 and shutil.which("g++") is not None


def merge_sources(space, names: list[str], tv_dir: Path | None) -> tuple[dict, dict]:
    """(tensor -> its merge inputs, memory-mapped; tensor -> (kind, label) of each, as the memory plan names
    them) for the space's method: the experts (linear), the base and its expert (slerp), or the base and
    each expert's task vector from `tv_dir` (task-vector methods)."""
    from .weights import _mapped

    labels, inputs = space.labels, METHODS[space.cfg.method].inputs
    tvs = [_mapped(tv_dir / f"{lbl}.safetensors") for lbl in labels] if inputs == "task_vectors" else []
    sources, kinds = {}, {}
    for n in names:
        if inputs == "experts":
            sources[n] = [space.experts[lbl].tensor(n) for lbl in labels]
            kinds[n] = [("expert", lbl) for lbl in labels]
        elif inputs == "slerp":
            sources[n] = [space.base.tensor(n), space.experts[labels[0]].tensor(n)]
            kinds[n] = [("base", "base"), ("expert", labels[0])]
        elif inputs == "base_experts":
            sources[n] = [space.base.tensor(n), *[space.experts[lbl].tensor(n) for lbl in labels]]
            kinds[n] = [("base", "base"), *[("expert", lbl) for lbl in labels]]
        else:
            sources[n] = [space.base.tensor(n), *[tv[n] for tv in tvs]]
            kinds[n] = [("base", "base"), *[("delta", lbl) for lbl in labels]]
    return sources, kinds


class MergeRuntime(ResidentModel):
    """A worker's resident model and the merge inputs of an `hf_merge` space, placed by the worker's
    memory plan (`inputs.py`).

    A candidate is one pass over every merged tensor in slices (`kernels.py`): candidate-independent
    statistics (magnitude tables, slerp's cosines) were computed once, so each slice is elementwise
    arithmetic, compiled into one fused kernel (`space.kernel`) or run eagerly. `space` is the
    HFMergeSpace: its cfg, labels, base and experts, tensor_group, gpu_share, prepare() and decode().
    """

    def __init__(self, space, device: str):
        import torch

        from .inputs import MergeInputs
        from .kernels import MagnitudeTable, Merger, slerp_stats, spec_for
        from .memplan import make_plan
        from .weights import _mapped

        super().__init__(space.base_path, space.base.names(), space.cfg.dtype, device)
        self.space = space
        cfg = space.cfg
        method, labels, entry = cfg.method, space.labels, METHODS[cfg.method]
        self.floats = [n for n, t in self.targets.items() if t.is_floating_point()]
        tv_dir = space.prepare() if entry.task_vectors else None
        self.sources, kinds = merge_sources(space, self.floats, tv_dir)
        gpu_bytes = torch.cuda.get_device_properties(self.device).total_memory if self.device.type == "cuda" else None
        self.plan = make_plan(space.base.slices(), method=method, labels=labels,
                              resident_dtype=str(self.model.dtype)[6:], delta_dtype=cfg.delta_dtype,
                              device=self.device.type, memory=cfg.memory, gpu_bytes=gpu_bytes,
                              gpu_share=space.gpu_share, measure_h2d=False)
        if not self.plan.fits:
            raise UserError(self.plan.why)
        tiers = {n: [self.plan.tier(kind, label, n) for kind, label in kinds[n]] for n in self.floats}
        self.inputs = MergeInputs(self.sources, tiers, self.device, cfg.memory.slice_mib << 20)
        tables = {}
        if entry.by_magnitude:
            stats = [_mapped(tv_dir / f"{lbl}.magnitudes.safetensors") for lbl in labels]
            tables = {n: [MagnitudeTable.load(st, n, self.sources[n][0].numel()) for st in stats]
                      for n in self.floats}
        slerp = entry.inputs == "slerp"
        compiled = cfg.kernel == "compiled" or (cfg.kernel == "auto" and auto_compiled(
            self.device.type, method, sum(t.numel() for t in self.targets.values())))
        if entry.kernel == "tensor":  # per-tensor methods: whole tensors, eager (tensormerge.py)
            from .tensor_methods import IMPLEMENTATIONS
            from .tensormerge import TensorMerger

            impl = IMPLEMENTATIONS[method](space.options, len(labels), cfg.normalize)
            impl.compiled = compiled  # the methods with a fused chunk pass (della, sce, nearswap) compile it
            self.merger = TensorMerger(impl, {n: tuple(self.targets[n].shape) for n in self.floats})
            if compiled:  # compile and prepare the statistics now, not inside the first candidate's merge_s
                self.materialize(space.decode(space.seeds()[0]))
            self.last_transfer_s = None
            return
        self.merger = Merger(spec_for(method, 1 if slerp else len(labels), cfg.normalize), self.device, tables,
                             {n: slerp_stats(*self.sources[n]) for n in self.floats} if slerp else {}, compiled)
        if compiled:  # compile now (seconds to tens of seconds), not inside the first candidate's merge_s
            self.materialize(space.decode(space.seeds()[0]))
        self.last_transfer_s = None

    def materialize(self, recipe: dict):
        """Merge the recipe into the resident model's parameters, in place."""
        groups = {n: recipe["groups"][self.space.tensor_group[n]] for n in self.floats}
        outs = {n: self.targets[n].data.view(-1) for n in self.floats}  # targets may be re-pointed (tests)
        self.inputs.transfer_s = None
        self.merger.run(self.inputs, outs, groups, recipe.get("seed", 0))
        self.last_transfer_s = self.inputs.transfer_s
        return self.model

    def weight_gradient(self, recipe: dict, loss_fn,
                        materialized: bool = False) -> tuple[float, dict[str, list[float]]]:
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
        linear = METHODS[method].inputs == "experts"  # X: the experts themselves, no base c
        normalize = recipe.get("normalize")
        normalize = METHODS[method].normalize if normalize is None else normalize
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
                    if p.grad is None:  # buffers, and parameters the loss does not reach
                        continue
                    g = self.space.tensor_group[name]
                    grad = p.grad.float().reshape(-1)
                    xs = self.sources[name] if linear else self.sources[name][1:]
                    dots = [float(torch.dot(grad, x.float().reshape(-1).to(grad.device))) for x in xs]
                    if normalize:
                        w = recipe["groups"][g]["weight"]
                        total = float(sum(w))
                        merged = p.float().reshape(-1)
                        if not linear:
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
