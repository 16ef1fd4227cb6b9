"""Per-tensor merge operators, with mergekit's parameter names and semantics.

Each operator merges one tensor of the base model with the matching tensors of the experts
and writes the result into `out` (a parameter of a resident model: no new model per
candidate). Task-vector methods take the experts as deltas (expert - base), computed once
per run by the caller. DARE's random masks are drawn from a generator seeded per tensor,
so a recipe always yields the same model.

| method | mergekit semantics |
| --- | --- |
| linear | sum_i w_i x_i, divided by sum_i w_i when normalize (default true) |
| task_arithmetic | base + sum_i w_i d_i; / sum_i w_i when normalize (default false) |
| ties | d_i trimmed to the top `density` share by magnitude, sign election by the sum of w_i d_i, disjoint mean (normalize default true) |
| dare_ties / dare_linear | d_i kept with probability `density` and rescaled by 1/density; with / without sign election |
| breadcrumbs / breadcrumbs_ties | d_i without the largest `gamma` share and the smallest, keeping `density`; without / with sign election |
| slerp | spherical interpolation base -> other by `t`, linear when the directions are nearly parallel |
"""
from __future__ import annotations

import hashlib
from typing import Sequence

import numpy as np
import torch

Tensor = torch.Tensor


# sparsification ----------------------------------------------------------------------------

def magnitude_mask(delta: Tensor, density: float) -> Tensor:
    """1 for the int(density * n) entries of largest magnitude, else 0."""
    if density >= 1:
        return torch.ones_like(delta)
    k = int(density * delta.numel())
    if k <= 0:
        raise ValueError(f"density {density} keeps no entry of a tensor with {delta.numel()} entries")
    mask = torch.zeros_like(delta)
    top = torch.argsort(delta.abs().reshape(-1).float(), descending=True)[:k]
    mask.view(-1)[top] = 1
    return mask


def outlier_mask(delta: Tensor, density: float, gamma: float) -> Tensor:
    """Breadcrumbs: drop the largest `gamma` share, then the smallest, keeping `density`."""
    if density >= 1:
        return torch.ones_like(delta)
    n = delta.numel()
    keep, top = int(density * n), int(gamma * n)
    bottom = n - keep - top
    if bottom < 0:
        top, bottom = top + bottom, 0
    order = torch.sort(delta.abs().reshape(-1).float()).indices
    mask = torch.zeros_like(delta)
    mask.view(-1)[order[bottom:n - top]] = 1
    return mask


def dare_mask(delta: Tensor, density: float, generator: torch.Generator) -> Tensor:
    """Bernoulli(density) mask scaled by 1/density (DARE's drop and rescale)."""
    if density >= 1:
        return torch.ones_like(delta)
    keep = torch.rand(delta.shape, generator=generator, dtype=torch.float32) < density
    return keep.to(delta.dtype) / density


def tensor_generator(seed: int, name: str, index: int) -> torch.Generator:
    """A generator seeded by (recipe seed, tensor name, expert index): masks never depend on call order."""
    digest = hashlib.blake2b(f"{seed}:{name}:{index}".encode(), digest_size=8).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest, "little") >> 1)


# mixing ------------------------------------------------------------------------------------

def _column(weights: Sequence[float], like: Tensor) -> Tensor:
    w = torch.tensor(list(weights), dtype=like.dtype)
    return w.view(-1, *([1] * like.dim()))


def sign_consensus(weighted: Tensor) -> Tensor:
    """TIES sign election: keep entries whose sign matches the sign of the summed deltas (0 counts as +)."""
    majority = (weighted.sum(dim=0) >= 0).to(weighted.dtype) * 2 - 1
    return weighted.sign() == majority


def mix_deltas(base: Tensor, deltas: Sequence[Tensor], weights: Sequence[float], out: Tensor, *,
               masks: Sequence[Tensor] | None = None, consensus: bool = False, normalize: bool = False) -> Tensor:
    """out = base + combined deltas (the generalized task arithmetic of TIES / DARE / breadcrumbs)."""
    d = torch.stack(list(deltas))
    if masks is not None:
        d = d * torch.stack(list(masks))
    w = _column(weights, base)
    weighted = d * w
    if consensus:
        keep = sign_consensus(weighted).to(base.dtype)
        mixed = (weighted * keep).sum(dim=0)
        divisor = (w * keep).sum(dim=0)
        divisor[divisor == 0] = 1
    else:
        mixed = weighted.sum(dim=0)
        total = float(w.sum())
        divisor = total if abs(total) >= 1e-8 else 1.0
    if normalize:
        mixed = mixed / divisor
    torch.add(base, mixed, out=out)
    return out


# operators ---------------------------------------------------------------------------------

def linear(tensors: Sequence[Tensor], weights: Sequence[float], out: Tensor, normalize: bool = True) -> Tensor:
    stacked = torch.stack(list(tensors))
    w = _column(weights, stacked[0])
    res = (w * stacked).sum(dim=0)
    if normalize:
        res = res / w.sum(dim=0)
    out.copy_(res)
    return out


def task_arithmetic(base, deltas, weights, out, normalize: bool = False):
    return mix_deltas(base, deltas, weights, out, normalize=normalize)


def ties(base, deltas, weights, densities, out, normalize: bool = True):
    masks = [magnitude_mask(d, p) for d, p in zip(deltas, densities)]
    return mix_deltas(base, deltas, weights, out, masks=masks, consensus=True, normalize=normalize)


def dare(base, deltas, weights, densities, out, *, seed: int, name: str, consensus: bool, normalize: bool = False):
    masks = [dare_mask(d, p, tensor_generator(seed, name, i)) for i, (d, p) in enumerate(zip(deltas, densities))]
    return mix_deltas(base, deltas, weights, out, masks=masks, consensus=consensus, normalize=normalize)


def breadcrumbs(base, deltas, weights, densities, gammas, out, *, consensus: bool = False, normalize: bool = False):
    masks = [outlier_mask(d, p, g) for d, p, g in zip(deltas, densities, gammas)]
    return mix_deltas(base, deltas, weights, out, masks=masks, consensus=consensus, normalize=normalize)


def slerp(t: float, v0: Tensor, v1: Tensor, out: Tensor, dot_threshold: float = 0.9995, eps: float = 1e-8) -> Tensor:
    """Spherical interpolation from v0 (t = 0) to v1 (t = 1) over the whole tensor (computed in float64)."""
    a, b = v0.double().reshape(-1), v1.double().reshape(-1)
    na, nb = a.norm(), b.norm()
    ua = a / na if na > eps else a
    ub = b / nb if nb > eps else b
    dot = float((ua * ub).sum())
    if abs(dot) > dot_threshold:
        res = (1 - t) * a + t * b
    else:
        theta = float(np.arccos(dot))
        s = float(np.sin(theta))
        res = float(np.sin(theta - theta * t)) / s * a + float(np.sin(theta * t)) / s * b
    out.copy_(res.view(v0.shape))
    return out


# (uses sign election, normalize default) of the task-vector methods, as in mergekit
_TASK_VECTOR = {
    "task_arithmetic": (False, False),
    "ties": (True, True),
    "dare_ties": (True, False),
    "dare_linear": (False, False),
    "breadcrumbs": (False, False),
    "breadcrumbs_ties": (True, False),
}
METHODS = ("linear", "slerp", *_TASK_VECTOR)


def merge_tensor(method: str, name: str, base: Tensor, experts: Sequence[Tensor], out: Tensor, *,
                 weights: Sequence[float] | None = None, density: Sequence[float] | None = None,
                 gamma: Sequence[float] | None = None, t: float | None = None, normalize: bool | None = None,
                 seed: int = 0, deltas: Sequence[Tensor] | None = None) -> Tensor:
    """Merge one tensor by `method` into `out`. Per-expert parameters are sequences, one per expert.

    `deltas` (expert - base, precomputed once per run) spare the subtraction; `linear` weights
    the experts themselves, and `slerp` goes from base (t = 0) to the single expert (t = 1).
    """
    n = len(experts)
    if method == "slerp":
        if n != 1:
            raise ValueError(f"slerp merges the base with exactly one expert, got {n}")
        return slerp(0.5 if t is None else t, base, experts[0], out)
    weights = [1.0] * n if weights is None else list(weights)
    if method == "linear":
        return linear(experts, weights, out, normalize=True if normalize is None else normalize)
    if method not in _TASK_VECTOR:
        raise ValueError(f"unknown merge method {method!r}; known: {', '.join(METHODS)}")
    consensus, default_normalize = _TASK_VECTOR[method]
    normalize = default_normalize if normalize is None else normalize
    deltas = [e - base for e in experts] if deltas is None else deltas
    density = [1.0] * n if density is None else list(density)
    if method == "task_arithmetic":
        return task_arithmetic(base, deltas, weights, out, normalize=normalize)
    if method == "ties":
        return ties(base, deltas, weights, density, out, normalize=normalize)
    if method.startswith("dare"):
        return dare(base, deltas, weights, density, out, seed=seed, name=name, consensus=consensus,
                    normalize=normalize)
    gamma = [0.01] * n if gamma is None else list(gamma)
    return breadcrumbs(base, deltas, weights, density, gamma, out, consensus=consensus, normalize=normalize)
