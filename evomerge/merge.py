"""Per-tensor merge operators, with mergekit's parameter names and semantics.

Each operator merges one tensor of the base model with the matching tensors of the experts
and writes the result into `out` (a parameter of a resident model: no new model per
candidate). Task-vector methods take the experts as deltas (expert - base), computed once
per run by the caller. DARE's random masks are a hash of (recipe seed, tensor,
expert, element), so a recipe always yields the same model. These are the reference operators
(one tensor, selection per call); the search runs merge through `kernels.py`, which computes the
selection statistics once per run and gives the same tensors.

The methods (`methods.METHODS`), with mergekit's semantics:

* linear: sum_i w_i x_i, divided by sum_i w_i when normalize (default true);
* task_arithmetic: base + sum_i w_i d_i; / sum_i w_i when normalize (default false);
* ties: d_i trimmed to the top `density` share by magnitude (ties at the threshold kept), sign election
  by the sum of w_i d_i, disjoint mean (normalize default true);
* dare_ties / dare_linear: d_i kept with probability `density` and rescaled by 1/density; with / without
  sign election;
* breadcrumbs / breadcrumbs_ties: d_i without the largest `gamma` share and the smallest, keeping
  `density`; without / with sign election;
* slerp: spherical interpolation base -> other by `t`, linear when the directions are nearly parallel.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from .dare import dare_numbers, tensor_key, uniform
from .methods import PARAMS, method as method_entry

Tensor = torch.Tensor


# sparsification ----------------------------------------------------------------------------

def magnitude_mask(delta: Tensor, density: float) -> Tensor:
    """1 where |d| is at least the k-th largest magnitude, k = max(1, int(density * n)) (mergekit's
    `magnitude`), else 0: the k largest entries, and every entry tied with the k-th.

    The k-th largest is found by a selection per call (numpy's introselect on CPU, torch.topk
    elsewhere); the search runs read it from a table computed once per run
    (`kernels.ties_bounds`), which gives the same mask. mergekit keeps exactly k entries, picking
    among ties at the threshold by the order of its unstable sort; the masks are the same whenever
    the k-th largest magnitude is unique.
    """
    if density >= 1:
        return torch.ones_like(delta)
    n = delta.numel()
    if density <= 0 or n == 0:
        return torch.zeros_like(delta)
    k = max(1, int(density * n))
    a = _magnitudes(delta)
    if a.device.type == "cpu":
        thr = float(np.partition(a.numpy(), n - k)[n - k])  # the k-th largest magnitude
    else:
        thr = float(torch.topk(a, k, sorted=False).values.min())
    return (a >= thr).to(delta.dtype).view(delta.shape)


def _magnitudes(delta: Tensor) -> Tensor:
    a = delta.detach().reshape(-1).abs()
    return a if a.dtype in (torch.float32, torch.float64) else a.float()


def outlier_mask(delta: Tensor, density: float, gamma: float) -> Tensor:
    """Breadcrumbs: drop the int(gamma * n) largest magnitudes, keep the next int(density * n), drop the rest.

    By value, as the search runs do (`kernels.breadcrumbs_bounds`): entries tied with the first or
    the last kept magnitude are kept too.
    """
    if density >= 1:
        return torch.ones_like(delta)
    n = delta.numel()
    keep, top = int(density * n), int(gamma * n)
    if keep <= 0 or n == 0:
        return torch.zeros_like(delta)
    top = min(top, n - keep)
    a = _magnitudes(delta)
    s = torch.sort(a).values
    lo, hi = s[n - top - keep], s[n - 1 - top]
    return ((a >= lo) & (a <= hi)).to(delta.dtype).view(delta.shape)


def dare_mask(delta: Tensor, density: float, key: int) -> Tensor:
    """Bernoulli(density) mask scaled by 1 / density (DARE's drop and rescale). The draw is a hash of
    (key, element index) (`dare.uniform`; key = `dare.tensor_key(seed, tensor, expert)`), so a
    recipe always yields the same model, on any device, whole or in slices."""
    if density >= 1:
        return torch.ones_like(delta)
    p, inv = dare_numbers(density)
    keep = uniform(key, 0, delta.numel(), delta.device).view(delta.shape) < p
    return keep.to(delta.dtype) * inv


# mixing ------------------------------------------------------------------------------------

def _shares(a: Tensor, b: Tensor) -> bool:
    """Whether two tensors use the same storage (then one cannot accumulate into the other)."""
    return a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()


def mix_deltas(base: Tensor, deltas: Sequence[Tensor], weights: Sequence[float], out: Tensor, *,
               masks: Sequence[Tensor] | None = None, consensus: bool = False, normalize: bool = False) -> Tensor:
    """out = base + combined deltas (the generalized task arithmetic of TIES / DARE / breadcrumbs).

    The same arithmetic as mergekit's `GeneralizedTaskArithmeticMerge`, in the same order
    (mask, then weight, then sum over experts in order), without stacking the experts: one
    temporary per expert and float masks only (mixed-dtype and boolean kernels are slow on CPU).
    With sign election, an entry of expert i is kept where sign(w_i d_i) equals the sign of
    sum_j w_j d_j (0 counts as +; zero entries are never kept), and the divisor sums the w_i
    of the kept entries. `out` may be `base` itself (then a temporary accumulates).
    """
    w = [float(x) for x in weights]
    weighted = []
    for i, d in enumerate(deltas):
        x = torch.mul(d, masks[i]) if masks is not None else d.clone()
        weighted.append(x.mul_(w[i]))
    # accumulate in `out`, add the base last
    mixed = torch.empty_like(out) if _shares(out, base) else out
    mixed.copy_(weighted[0])
    for x in weighted[1:]:
        mixed.add_(x)
    if consensus:
        majority = torch.ge(mixed, 0, out=torch.empty_like(mixed)).mul_(2).sub_(1)  # +1 / -1
        divisor = torch.zeros_like(mixed)
        keep = torch.empty_like(mixed)
        mixed.zero_()
        for x, wi in zip(weighted, w):
            x.mul_(majority)  # exact (a sign flip): kept entries are now > 0
            torch.gt(x, 0, out=keep)
            mixed.add_(x.clamp_min_(0))
            divisor.add_(keep, alpha=wi)
        mixed.mul_(majority)
        if normalize:
            divisor.add_(torch.eq(divisor, 0, out=keep))  # 0 -> 1 (no expert kept), without a bool kernel
            mixed.div_(divisor)
    elif normalize:
        total = float(torch.tensor(w, dtype=torch.float64 if base.dtype == torch.float64 else torch.float32).sum())
        if abs(total) >= 1e-8:
            mixed.div_(total)
    if mixed is out:
        return out.add_(base)
    return torch.add(base, mixed, out=out)


# operators ---------------------------------------------------------------------------------

def linear(tensors: Sequence[Tensor], weights: Sequence[float], out: Tensor, normalize: bool = True) -> Tensor:
    """sum_i w_i x_i (/ sum_i w_i), accumulated in `out` in mergekit's order, without temporaries.

    `out` may be one of the inputs (then a temporary accumulates).
    """
    if any(_shares(out, x) for x in tensors[1:]):
        return out.copy_(linear(tensors, weights, torch.empty_like(out), normalize=normalize))
    w = torch.tensor([float(x) for x in weights], dtype=torch.float64 if out.dtype == torch.float64 else torch.float32)
    coefficients = w.tolist()
    torch.mul(tensors[0], coefficients[0], out=out)
    for x, wi in zip(tensors[1:], coefficients[1:]):
        out.add_(x, alpha=wi)
    if normalize:
        out.div_(float(w.sum()))
    return out


def _masks(mask: str | None, deltas, density, gamma, seed: int, name: str) -> list[Tensor] | None:
    """Each expert's selection mask of task-vector entries, by the method's `mask` (methods.Method)."""
    if mask is None:
        return None
    if mask == "magnitude":
        return [magnitude_mask(d, p) for d, p in zip(deltas, density)]
    if mask == "outlier":
        return [outlier_mask(d, p, g) for d, p, g in zip(deltas, density, gamma)]
    return [dare_mask(d, p, tensor_key(seed, name, i)) for i, (d, p) in enumerate(zip(deltas, density))]


def slerp(t: float, v0: Tensor, v1: Tensor, out: Tensor, dot_threshold: float = 0.9995, eps: float = 1e-8) -> Tensor:
    """Spherical interpolation from v0 (t = 0) to v1 (t = 1) over the whole tensor, as mergekit does it:
    in float32 (float64 for float64 inputs), linear when the normalized directions are nearly
    parallel or antiparallel (|cos| > dot_threshold), norms below `eps` taken as 1."""
    dtype = torch.float64 if v0.dtype == torch.float64 else torch.float32
    a, b = v0.reshape(-1).to(dtype), v1.reshape(-1).to(dtype)
    na, nb = torch.linalg.vector_norm(a), torch.linalg.vector_norm(b)
    na = torch.where(na > eps, na, 1)
    nb = torch.where(nb > eps, nb, 1)
    dot = float(((a / na) * (b / nb)).sum().clamp(-1, 1))
    tt = torch.tensor(t, dtype=dtype)
    if abs(dot) > dot_threshold:
        ca, cb = 1 - tt, tt
    else:
        theta = torch.acos(torch.tensor(dot, dtype=dtype))
        s = torch.sin(theta)
        ca, cb = torch.sin((1 - tt) * theta) / s, torch.sin(tt * theta) / s
    res = a * ca + b * cb
    out.copy_(res.view(v0.shape))
    return out


def merge_tensor(method: str, name: str, base: Tensor, experts: Sequence[Tensor], out: Tensor, *,
                 weights: Sequence[float] | None = None, density: Sequence[float] | None = None,
                 gamma: Sequence[float] | None = None, t: float | None = None, normalize: bool | None = None,
                 seed: int = 0, deltas: Sequence[Tensor] | None = None, params: dict | None = None,
                 options: dict | None = None) -> Tensor:
    """Merge one tensor by `method` (an entry of `methods.METHODS`) into `out`. Per-expert parameters are
    sequences, one per expert; a parameter not given takes its `methods.PARAMS` unset value.

    `deltas` (expert - base, precomputed once per run) spare the subtraction; `linear` weights
    the experts themselves, and `slerp` goes from base (t = 0) to the single expert (t = 1). The per-tensor
    methods (`tensor_methods.py`) take their parameters as `params` ({param: values}, e.g. epsilon,
    select_topk) beside weights / density / t, and their settings as `options` (the method's defaults first).
    """
    m, n = method_entry(method), len(experts)
    if m.kernel == "tensor":
        from .tensor_methods import IMPLEMENTATIONS

        group = dict(params or {})
        for p, v in (("weight", weights), ("density", density), ("gamma", gamma), ("t", None if t is None else [t])):
            if v is not None and p in m.params:
                group[p] = list(v)
        for p in m.params:
            group.setdefault(p, [PARAMS[p].unset] * (1 if PARAMS[p].shared else n))
        impl = IMPLEMENTATIONS[method]({**dict(m.options), **(options or {})}, n, normalize)
        with torch.no_grad():
            impl.merge(name, base, list(experts), group, impl.prepare(name, base, list(experts)), seed, out)
        return out
    normalize = m.normalize if normalize is None else normalize
    if m.inputs == "slerp":
        if n != 1:
            raise ValueError(f"slerp merges the base with exactly one expert, got {n}")
        return slerp(PARAMS["t"].unset if t is None else t, base, experts[0], out)
    weights, density, gamma = ([PARAMS[p].unset] * n if v is None else list(v)
                               for p, v in (("weight", weights), ("density", density), ("gamma", gamma)))
    if m.inputs == "experts":
        return linear(experts, weights, out, normalize=normalize)
    deltas = [e - base for e in experts] if deltas is None else deltas
    return mix_deltas(base, deltas, weights, out, masks=_masks(m.mask, deltas, density, gamma, seed, name),
                      consensus=m.consensus, normalize=normalize)
