"""The per-tensor merge methods (`methods.Method.kernel` "tensor"): della, sce, ram, model_stock, nuslerp, ...

Each is a `TensorMethod` (`tensor_methods.IMPLEMENTATIONS`): what does not depend on the candidate is computed
once per run per tensor (`prepare`: norms, Gram matrices, ranks, counts), so a candidate is a few
elementwise passes over the tensor's inputs (`merge`). A method reads the base and every expert, raw
(inputs "base_experts"), one whole tensor at a time: `TensorMerger` hands each merged tensor's full inputs,
on the worker's device, to the method with the tensor's group of recipe parameters, and the method writes
the merged tensor into the resident model's parameter.
"""
from __future__ import annotations

from typing import Any, Sequence

import torch

Tensor = torch.Tensor


class TensorMethod:
    """One method's arithmetic over one tensor. `options`: the method's settings (`methods.Method.options`
    over space.options), `experts`: how many experts it merges, `normalize`: space.normalize (None: the
    method's default).

    `prepare(name, base, experts)` returns the tensor's candidate-independent statistics (any object; small
    ones kept in memory, full-size ones the implementation keeps off the device); `merge(name, base, experts,
    group, stats, seed, out)` writes the merged tensor into `out` (same shape and dtype as base; may be the
    resident model's parameter). `group`: {param: values} (one per expert; one for shared parameters), `seed`:
    the recipe's seed (random masks are drawn from it by `dare.uniform`, so a recipe always gives the same model).
    Inputs are shaped like the tensor, on the device, in their checkpoint dtype; arithmetic in float32
    (float64 for float64 inputs), as mergekit computes on float32 checkpoints.
    """

    compiled = False  # set by the runtime when it compiles (runtime.auto_compiled): a method may fuse its passes

    def __init__(self, options: dict[str, Any], experts: int, normalize: bool | None = None):
        self.options, self.n, self.normalize = dict(options), experts, normalize

    def prepare(self, name: str, base: Tensor, experts: Sequence[Tensor]) -> Any:
        return None

    def merge(self, name: str, base: Tensor, experts: Sequence[Tensor], group: dict[str, list[float]], stats: Any,
              seed: int, out: Tensor) -> None:
        raise NotImplementedError


def work_dtype(t: Tensor) -> torch.dtype:
    """float64 for float64 inputs, else float32."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32


class TensorMerger:
    """One candidate's pass over every merged tensor, whole tensors at a time, by a `TensorMethod`.

    `inputs`: the worker's `inputs.MergeInputs` over [base, expert_1, ..., expert_k] per tensor; `shapes`: the
    tensors' shapes. Statistics are prepared once, on the first use of each tensor (its first candidate)."""

    def __init__(self, impl: TensorMethod, shapes: dict[str, tuple[int, ...]]):
        self.impl, self.shapes = impl, shapes
        self.stats: dict[str, Any] = {}

    def run(self, inputs, outs: dict, groups: dict, seed: int = 0) -> None:
        with torch.no_grad():
            for name in inputs.order:
                shape = self.shapes[name]
                views = [v.view(shape) for v in inputs.whole(name)]
                if name not in self.stats:
                    self.stats[name] = self.impl.prepare(name, views[0], views[1:])
                self.impl.merge(name, views[0], views[1:], groups[name], self.stats[name], seed,
                                outs[name].view(shape))
