"""Per-candidate merge kernels over statistics computed once per run.

The per-tensor operators of `merge.py` select, for every candidate, the top entries of every task
vector (a selection pass over each delta) and then run one kernel per operation per expert. Here
what does not depend on the candidate is computed once per run:

* `MagnitudeTable`: the magnitudes of one task-vector tensor, from which the magnitude at any rank
  is read in O(log n): for 16-bit deltas the count of every bit pattern of |d| (at most 32,768
  distinct magnitudes, a few KiB per tensor); for float32 deltas the sorted magnitudes (memory-mapped
  from the cache). A TIES / breadcrumbs mask is then a comparison with two numbers.
* DARE's keep draw is a counter-based hash of (recipe seed, tensor, expert, element index) (`dare.py`), so
  a slice of a tensor can be masked anywhere (CPU or GPU, resident or streamed) without a generator.
* slerp's dot product and norms of (base, expert) per tensor.

A candidate is then one elementwise pass per tensor over the base and every expert's slice
(`merge_slice`), eager or compiled (torch.compile fuses it into one kernel: one read of each input,
one write of the output).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from .dare import dare_numbers, tensor_key, uniform
from .merge import linear
from .methods import METHODS, PARAMS

Tensor = torch.Tensor
NONE, ALL = (math.inf, -1.0), (-1.0, math.inf)  # (lo, hi) bounds keeping nothing / everything


# magnitude statistics ---------------------------------------------------------------------------

_HALF = (torch.bfloat16, torch.float16)


@dataclass
class MagnitudeTable:
    """Magnitudes of one tensor's n entries: `values` ascending; `cum[j]` = entries <= values[j]
    (None: `values` holds every entry, sorted)."""

    n: int
    values: np.ndarray
    cum: np.ndarray | None = None

    @classmethod
    def of(cls, delta: Tensor) -> "MagnitudeTable":
        a = delta.detach().reshape(-1).abs()
        if a.dtype in _HALF:  # every magnitude is one of 32,768 bit patterns: count them
            counts = torch.bincount(a.view(torch.int16).to(torch.int32), minlength=1 << 15)
            patterns = torch.nonzero(counts).reshape(-1)
            values = patterns.to(torch.int16).view(a.dtype).float().numpy()
            return cls(a.numel(), values, counts[patterns].cumsum(0).numpy())
        return cls(a.numel(), np.sort(a.to(torch.float32).numpy()))

    def at(self, rank: int) -> float:
        """The magnitude at descending rank `rank` (0: the largest)."""
        asc = self.n - 1 - rank
        if self.cum is None:
            return float(self.values[asc])
        return float(self.values[int(np.searchsorted(self.cum, asc, side="right"))])

    def arrays(self, prefix: str) -> dict[str, Tensor]:
        out = {f"{prefix}:values": torch.from_numpy(np.ascontiguousarray(self.values, np.float32))}
        if self.cum is not None:
            out[f"{prefix}:cum"] = torch.from_numpy(np.ascontiguousarray(self.cum, np.int64))
        return out

    @classmethod
    def load(cls, arrays: dict[str, Tensor], prefix: str, n: int) -> "MagnitudeTable":
        cum = arrays.get(f"{prefix}:cum")
        return cls(n, arrays[f"{prefix}:values"].numpy(), None if cum is None else cum.numpy())


def ties_bounds(table: MagnitudeTable, density: float) -> tuple[float, float]:
    """Keep the k = max(1, int(density * n)) largest magnitudes: |d| >= the k-th largest (ties at it kept)."""
    if density >= 1:
        return ALL
    if density <= 0 or table.n == 0:
        return NONE
    return table.at(max(1, int(density * table.n)) - 1), math.inf


def breadcrumbs_bounds(table: MagnitudeTable, density: float, gamma: float) -> tuple[float, float]:
    """Drop the int(gamma * n) largest, keep the next int(density * n): lo <= |d| <= hi (ties at both kept)."""
    if density >= 1:
        return ALL
    n = table.n
    keep, top = int(density * n), int(gamma * n)
    if keep <= 0 or n == 0:
        return NONE
    top = min(top, n - keep)
    return table.at(top + keep - 1), table.at(top)


# one slice of one tensor -------------------------------------------------------------------------

@dataclass(frozen=True)
class SliceSpec:
    """The candidate-independent shape of a merge: which terms the kernel computes (from `methods.METHODS`)."""

    method: str
    experts: int
    inputs: str  # experts (linear), slerp, or task_vectors
    masked: str = ""  # "", "band" (magnitude or outlier bounds: ties / breadcrumbs) or "dare"
    consensus: bool = False
    normalize: bool = False


def _tv(spec: SliceSpec, base: Tensor, deltas: Sequence[Tensor], p: Tensor, offset, keys) -> Tensor:
    """base + combined deltas for one slice, in float32 (float64 inputs: float64), mergekit's order.

    p: (experts, 5) per expert [weight, lo or density, hi, 1 / density, sum of weights]; masks: band
    lo <= |d| <= hi, dare uniform < density (the kept delta rescaled by 1 / density before weighting).
    """
    dt = torch.float64 if base.dtype == torch.float64 else torch.float32
    xs = []
    for i, d in enumerate(deltas):
        d = d.to(dt)
        if spec.masked == "band":
            a = d.abs()
            d = torch.where((a >= p[i, 1]) & (a <= p[i, 2]), d, 0.0)
        elif spec.masked == "dare":
            u = uniform(keys[i], offset, d.numel(), d.device).view(d.shape)
            d = torch.where(u < p[i, 1], d * p[i, 3], 0.0)
        xs.append(d * p[i, 0])
    mixed = xs[0]
    for x in xs[1:]:
        mixed = mixed + x
    if spec.consensus:
        majority = torch.where(mixed >= 0, 1.0, -1.0).to(dt)
        total = torch.zeros_like(mixed)
        divisor = torch.zeros_like(mixed)
        for i, x in enumerate(xs):
            y = (x * majority).clamp_min(0)
            total = total + y
            divisor = divisor + torch.where(y > 0, p[i, 0], 0.0)
        mixed = total * majority
        if spec.normalize:
            mixed = mixed / torch.where(divisor == 0, 1.0, divisor)
    elif spec.normalize:
        mixed = mixed / p[0, 4]  # 1 when the weights sum to (nearly) 0
    return base.to(dt) + mixed


def _linear(spec: SliceSpec, xs: Sequence[Tensor], p: Tensor) -> Tensor:
    dt = torch.float64 if xs[0].dtype == torch.float64 else torch.float32
    out = xs[0].to(dt) * p[0, 0]
    for i, x in enumerate(xs[1:], 1):
        out = out + x.to(dt) * p[i, 0]
    if spec.normalize:
        out = out / p[0, 4]
    return out


def _slerp(a: Tensor, b: Tensor, p: Tensor) -> Tensor:
    dt = torch.float64 if a.dtype == torch.float64 else torch.float32
    return a.to(dt) * p[0, 0] + b.to(dt) * p[0, 1]


def _slice_kernel(spec: SliceSpec, out: Tensor, base, inputs, p, offset, keys) -> None:
    if spec.inputs == "experts":
        res = _linear(spec, inputs, p)
    elif spec.inputs == "slerp":
        res = _slerp(base, inputs[0], p)
    else:
        res = _tv(spec, base, inputs, p, offset, keys)
    out.copy_(res)


_COMPILED = {}


def compiled_kernel():
    """The slice kernel compiled by torch.compile (one fused pass; compiled once per process and
    argument layout, shapes dynamic)."""
    if "k" not in _COMPILED:
        _COMPILED["k"] = torch.compile(_slice_kernel, dynamic=True)
    return _COMPILED["k"]


def spec_for(method: str, experts: int, normalize: bool | None) -> SliceSpec:
    m = METHODS[method]
    if m.inputs == "slerp":
        return SliceSpec(method, 1, m.inputs)
    masked = "band" if m.by_magnitude else m.mask or ""
    return SliceSpec(method, experts, m.inputs, masked, m.consensus, m.normalize if normalize is None else normalize)


def slice_params(spec: SliceSpec, group: dict, tables=None, slerp_coeffs=None) -> list[list[float]]:
    """The (experts, 5) numbers of one tensor for one candidate (see `_tv`)."""
    if spec.inputs == "slerp":
        return [[slerp_coeffs[0], slerp_coeffs[1], 0.0, 1.0, 1.0]]
    n = spec.experts
    w, density, gamma = ([float(x) for x in group.get(p, [PARAMS[p].unset] * n)]
                         for p in ("weight", "density", "gamma"))
    total = float(torch.tensor(w, dtype=torch.float32).sum())
    if spec.inputs == "task_vectors" and abs(total) < 1e-8:
        total = 1.0
    top = METHODS[spec.method].mask == "magnitude"  # TIES: the top share; breadcrumbs: a band below the top
    rows = []
    for i in range(n):
        lo, hi, inv = *ALL, 1.0
        if spec.masked == "band":
            lo, hi = (ties_bounds(tables[i], density[i]) if top
                      else breadcrumbs_bounds(tables[i], density[i], gamma[i]))
        elif spec.masked == "dare":
            lo, inv = dare_numbers(density[i]) if density[i] < 1 else (2.0, 1.0)  # u < 2: always kept
        rows.append([w[i], lo, hi, inv, total])
    return rows


def slerp_coefficients(stats: tuple[float, float, float], t: float, dtype=torch.float32,
                       dot_threshold: float = 0.9995) -> tuple[float, float]:
    """(ca, cb) with slerp(t) = ca * base + cb * expert, from the tensor's cosine (see merge.slerp)."""
    dot = stats[0]
    tt = torch.tensor(t, dtype=dtype)
    if abs(dot) > dot_threshold:
        return float(1 - tt), float(tt)
    theta = torch.acos(torch.tensor(dot, dtype=dtype))
    s = torch.sin(theta)
    return float(torch.sin((1 - tt) * theta) / s), float(torch.sin(tt * theta) / s)


def slerp_stats(a: Tensor, b: Tensor, eps: float = 1e-8) -> tuple[float, float, float]:
    """The cosine of two tensors, as merge.slerp computes it (norms below eps taken as 1)."""
    dtype = torch.float64 if a.dtype == torch.float64 else torch.float32
    a, b = a.reshape(-1).to(dtype), b.reshape(-1).to(dtype)
    na, nb = torch.linalg.vector_norm(a), torch.linalg.vector_norm(b)
    na = torch.where(na > eps, na, 1)
    nb = torch.where(nb > eps, nb, 1)
    return float(((a / na) * (b / nb)).sum().clamp(-1, 1)), float(na), float(nb)


class Merger:
    """One candidate's pass over every merged tensor: `run(inputs, outs, groups, seed)` writes each
    slice of `inputs.units()` into `outs[name]` (flat views of the resident model's tensors) with the
    tensor's group of recipe parameters (weight, density, gamma or t per expert)."""

    EAGER_SLICE = 1 << 20  # elements per eager slice: bounded temporaries for any tensor size

    def __init__(self, spec: SliceSpec, device, tables: dict | None = None, slerp: dict | None = None,
                 compiled: bool = False):
        self.spec, self.device = spec, torch.device(device)
        self.tables, self.slerp = tables or {}, slerp or {}
        self.kernel = compiled_kernel() if compiled else None
        self._compiled_ok = False
        self._keys, self._offsets = {}, {}

    def _first_compiled(self, inputs, outs, groups, seed) -> None:
        """The first compiled pass compiles; if compiling fails (no C++ compiler, an unsupported device),
        say so once and merge eagerly from then on: the same arithmetic."""
        import sys

        try:
            self._compiled_ok = True
            self.run(inputs, outs, groups, seed)
        except Exception as e:  # noqa: BLE001 - any compiler failure: the eager kernel computes the same
            first = (str(e).strip().splitlines() or [""])[0][:200]
            print(f"warning: space.kernel: compiling the merge kernel failed ({type(e).__name__}: {first}); "
                  f"merging eagerly", file=sys.stderr)
            self.kernel = None
            self.run(inputs, outs, groups, seed)

    def keys(self, seed: int, name: str) -> Tensor:
        if (seed, name) not in self._keys:
            self._keys[(seed, name)] = torch.tensor([tensor_key(seed, name, i) for i in range(self.spec.experts)],
                                                    dtype=torch.int64, device=self.device)
        return self._keys[(seed, name)]

    def params(self, name: str, group: dict) -> Tensor:
        coeffs = slerp_coefficients(self.slerp[name], group["t"][0]) if self.spec.inputs == "slerp" else None
        return torch.tensor(slice_params(self.spec, group, self.tables.get(name), coeffs), dtype=torch.float32,
                            device=self.device)

    def run(self, inputs, outs: dict, groups: dict, seed: int = 0) -> None:
        if self.kernel is not None and not self._compiled_ok:
            self._first_compiled(inputs, outs, groups, seed)
            return
        spec, eager = self.spec, self.kernel is None
        kernel = self.kernel or _slice_kernel
        params = {}
        with torch.no_grad():
            for u in inputs.units(self.EAGER_SLICE if eager else None):
                if u.name not in params:
                    params[u.name] = self.params(u.name, groups[u.name])
                p, out = params[u.name], outs[u.name][u.offset:u.offset + u.n]
                if eager and spec.inputs == "experts":  # merge.linear: in place, mergekit's order
                    xs = [v.float() for v in u.views]
                    w = p[:, 0].tolist()
                    if out.dtype == torch.float32:
                        linear(xs, w, out, normalize=spec.normalize)
                    else:
                        out.copy_(linear(xs, w, torch.empty_like(xs[0]), normalize=spec.normalize))
                    continue
                tv = spec.inputs != "experts"
                offset = self._offsets.get(u.offset)
                if offset is None:  # a 0-d device tensor per slice offset, made once (not a copy per slice)
                    offset = self._offsets[u.offset] = torch.tensor(u.offset, dtype=torch.int64, device=self.device)
                kernel(spec, out, u.views[0] if tv else None, u.views[1:] if tv else u.views, p, offset,
                       self.keys(seed, u.name) if spec.masked == "dare" else None)
