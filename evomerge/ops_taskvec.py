"""Per-tensor task-vector methods: della, della_linear, sce, ram and ramplus_tl (mergekit 0.1.5's semantics;
`tensormerge.TensorMethod`).

Every method works on task vectors d_i = expert_i - base, computed in the work dtype (float32; float64 for
float64 inputs) chunk by chunk (`CHUNK` entries of the flat tensor at a time), so a merge's temporaries are a
few chunks whatever the tensor's size and the number of experts, never a stack of whole task vectors.

What does not depend on the candidate is computed once per run per tensor (`prepare`):

* della / della_linear: each task-vector entry's magnitude rank within its row (mergekit's
  `della_magprune`: ranks along dim 1; 1-D tensors are one row, as mergekit's unsqueeze(0)), stored as int16
  when rows hold at most 32768 entries (every 1-D and 2-D tensor of the usual LMs), else int32: 2 (4) bytes per
  entry per expert, kept in host memory (pinned when the inputs are on a GPU) and copied to the device a chunk
  at a time (computed a block of rows at a time: no full-size temporary on the device); and each task
  vector's L1 norm. A candidate draws the keep masks from `dare.uniform` (a hash of
  (seed, tensor, expert, index): a recipe always gives the same model), with mergekit's keep probability
  (density - epsilon) + rank_norm * 2 * epsilon; with `rescale` (mergekit's L1 rescale) the masked task vectors'
  L1 norms are one reduction pass, which keeps the masks bit-packed on the device (1/8 byte per entry per
  expert, for the tensor being merged only) so that the hash is drawn once; then mergekit's generalized task
  arithmetic (weights, TIES sign election by sum for della, divisor, normalize) in one elementwise pass.
* sce: the rank of every entry's variance across the experts (int32: 4 bytes per entry, one table per tensor,
  in host memory), the count of non-zero variances, and the task vectors' mean squares. The variance is
  sorted on the device when its free memory holds the sort's temporaries (32 bytes per entry), else on the
  host. A candidate's top-k
  mask is rank < k: exactly mergekit's k entries (mergekit's torch.topk breaks ties among equal variances in
  an unspecified order; ours by position, a stable sort). With select_topk < 1 the masked task vectors' mean
  squares (sce's weights) are one reduction pass, then the sign election and weighted mean in one pass.
* ram: nothing is searched: each merge recomputes the tensor in one elementwise pass (no statistics).
* ramplus_tl: each expert's overlap ratio rho (shared / unique non-zero entries: k floats); a candidate is one
  elementwise pass with its lambda_i = 1 + r * clamp(rho_i, 0, alpha).
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import torch

from . import dare
from .methods import METHODS
from .tensormerge import TensorMethod, work_dtype

Tensor = torch.Tensor
CHUNK = 1 << 21  # flat entries per chunk (a multiple of 8: the packed masks' bytes)
_BITS: dict[torch.device, Tensor] = {}


def uniform(key: int, offset: int, n: int, device) -> Tensor:
    """`dare.uniform(key, offset, n, device)`, bit for bit, computed in place (a few times faster: no
    temporaries per hash round)."""
    h = torch.arange(offset, offset + n, dtype=torch.int64, device=device)
    h.bitwise_xor_(key).bitwise_and_(dare.M31)
    tmp = torch.empty_like(h)
    for c in dare._C:
        h.mul_(c).bitwise_and_(dare.M31)
        torch.bitwise_right_shift(h, 15, out=tmp)
        h.bitwise_xor_(tmp)
    h.bitwise_right_shift_(7)
    return h.to(torch.float32).mul_(2.0 ** -24)


def _spans(n: int):
    for off in range(0, n, CHUNK):
        yield off, min(CHUNK, n - off)


def _flat(t: Tensor) -> Tensor:
    return t.reshape(-1)


def _host_empty(shape, dtype: torch.dtype, device: torch.device) -> Tensor:
    """A full-size statistic's home: host memory, pinned when the inputs are on a GPU (pageable where pinning
    fails)."""
    if device.type == "cuda":
        try:
            return torch.empty(shape, dtype=dtype, pin_memory=True)
        except RuntimeError:
            pass
    return torch.empty(shape, dtype=dtype)


def _host(t: Tensor, device: torch.device) -> Tensor:
    if t.device.type == "cpu" and device.type != "cuda":
        return t
    return _host_empty(t.shape, t.dtype, device).copy_(t)


def _chunk(t: Tensor, off: int, cnt: int, device: torch.device) -> Tensor:
    return t[off:off + cnt].to(device, non_blocking=True)


def _bits(device: torch.device) -> Tensor:
    if device not in _BITS:
        _BITS[device] = torch.tensor([1 << j for j in range(8)], dtype=torch.uint8, device=device)
    return _BITS[device]


def _pack(keep: Tensor) -> Tensor:
    """A bool vector as bytes, 8 entries a byte (zero-padded to a multiple of 8)."""
    pad = -keep.numel() % 8
    if pad:
        keep = torch.cat([keep, keep.new_zeros(pad)])
    return (keep.view(torch.uint8).view(-1, 8) * _bits(keep.device)).sum(dim=1, dtype=torch.uint8)


def _unpack(packed: Tensor, cnt: int) -> Tensor:
    return ((packed.unsqueeze(1) & _bits(packed.device)) != 0).view(-1)[:cnt]


def _tv(e: Tensor, b: Tensor, dt: torch.dtype) -> Tensor:
    return e.to(dt) - b.to(dt)


# compiled chunk arithmetic ------------------------------------------------------------------------------------

_COMPILED: dict[str, Any] = {}
_FAILED: list[str] = []  # the first compile failure of the process (then every merge is eager)


def compiled(fn):
    """`fn` compiled by torch.compile (one fused pass per chunk; compiled once per process and argument
    layout, shapes dynamic)."""
    if fn.__name__ not in _COMPILED:
        _COMPILED[fn.__name__] = torch.compile(fn, dynamic=True)
    return _COMPILED[fn.__name__]


class Compilable(TensorMethod):
    """A method whose chunk arithmetic may run compiled (`compiled`: set by the runtime where compiling pays,
    as for the slice kernels: `runtime.auto_compiled`). The compiled passes compute what the eager ones do,
    to the bit; if compiling fails (no C++ compiler, an unsupported device) the first merge says so once and
    every merge of the process is eager from then on."""

    compiled = False

    def fast(self) -> bool:
        return bool(self.compiled) and not _FAILED

    def fallback(self, e: Exception) -> None:
        import sys

        first = (str(e).strip().splitlines() or [""])[0][:200]
        _FAILED.append(first)
        print(f"warning: {self.__class__.__name__}: compiling the merge's chunk arithmetic failed "
              f"({type(e).__name__}: {first}); merging eagerly", file=sys.stderr)


# DELLA -----------------------------------------------------------------------------------------------------

def della_epsilon(name: str, density: float, epsilon: float) -> float:
    """DELLA's epsilon, clamped as `hf_merge.decode` does where density -/+ epsilon leaves (0, 1) (mergekit
    raises there)."""
    if not (math.isfinite(density) and math.isfinite(epsilon)):
        raise ValueError(f"{name}: della needs finite density and epsilon, got {density}, {epsilon}")
    if density < 1 and (density - epsilon <= 0 or density + epsilon >= 1):
        return 0.999 * min(density, 1 - density)
    return epsilon


def magnitude_ranks(base: Tensor, expert: Tensor, dt: torch.dtype) -> tuple[Tensor, int, float]:
    """(0-based rank of |expert - base| along dim 1 (1-D: over the whole vector), flat, int16 / int32 by row
    length, in host memory (pinned for a GPU); the row length; the task vector's L1 norm). Computed a block of
    rows at a time: no full-size temporary on the device."""
    shape, dev = tuple(base.shape), base.device
    rows, length = (shape[0], shape[1]) if base.dim() >= 2 else (1, base.numel())
    rest = base.numel() // max(1, rows * length)
    vb, ve = base.reshape(rows, length, rest), expert.reshape(rows, length, rest)
    dtype = torch.int16 if length <= 1 << 15 else torch.int32
    ranks = _host_empty((rows, length, rest), dtype, dev)
    step = max(1, CHUNK // max(1, length * rest))
    pos = torch.arange(length, dtype=torch.int64, device=dev).view(1, length, 1)
    l1 = torch.zeros((), dtype=torch.float64, device=dev)  # sums stay on the device: one sync per tensor
    for r0 in range(0, rows, step):
        a = _tv(ve[r0:r0 + step], vb[r0:r0 + step], dt).abs_()
        l1 += a.sum(dtype=dt)
        idx = torch.sort(a, dim=1, stable=True).indices
        r = torch.empty_like(idx)
        r.scatter_(1, idx, pos.expand_as(idx))
        ranks[r0:r0 + step].copy_(r.to(dtype))
    return ranks.view(-1), length, float(l1)


def _della_l1(b: Tensor, e: Tensor, rank: Tensor, p: Tensor, key: Tensor, off: Tensor) -> Tensor:
    """One chunk's masked L1 norm, in float64 (so any summation order gives the same float32 rescale).
    p: [a, c] (the keep probability a + rank * c)."""
    dt = torch.float64 if b.dtype == torch.float64 else torch.float32
    d = (e.to(dt) - b.to(dt)).abs()
    keep = dare.uniform(key, off, d.numel(), d.device) < rank.to(dt) * p[1] + p[0]
    return (d * keep).sum(dtype=torch.float64)


def _della_chunk(out: Tensor, b: Tensor, es: list[Tensor], ranks: list[Tensor], p: Tensor, keys: Tensor,
                 off: Tensor, consensus: bool, normalize: bool) -> None:
    """One chunk of della's generalized task arithmetic, fused: p (experts, 5) per expert [a, c, rescale x
    weight, weight, divisor]; an expert's delta kept where uniform < a + rank * c (a = 2: every entry; its
    factor 0: none)."""
    dt = torch.float64 if b.dtype == torch.float64 else torch.float32
    bc = b.to(dt)
    ds = []
    for i in range(len(es)):
        d = es[i].to(dt) - bc
        keep = dare.uniform(keys[i], off, d.numel(), d.device) < ranks[i].to(dt) * p[i, 1] + p[i, 0]
        ds.append(d * keep * p[i, 2])
    mixed = ds[0]
    for d in ds[1:]:
        mixed = mixed + d
    if consensus:
        sign = torch.where(mixed >= 0, 1.0, -1.0).to(dt)
        mixed, div = torch.zeros_like(bc), torch.zeros_like(bc)
        for i, d in enumerate(ds):
            kept = (d * sign > 0).to(dt)
            mixed = mixed + d * kept
            div = div + kept * p[i, 3]
        if normalize:
            mixed = mixed / torch.where(div == 0, 1.0, div)
    elif normalize:
        mixed = mixed / p[0, 4]
    out.copy_(bc + mixed)


class Della(Compilable):
    """DELLA (mergekit's `della`): MagPrune (keep probabilities density -/+ epsilon by magnitude rank within
    each row, optional L1 rescale), then generalized task arithmetic with TIES sign election by sum."""

    method = "della"
    consensus = True

    def prepare(self, name: str, base: Tensor, experts: Sequence[Tensor]) -> Any:
        dt, ranks, l1, length = work_dtype(base), [], [], 1
        for e in experts:
            r, length, norm = magnitude_ranks(base, e, dt)
            ranks.append(r)
            l1.append(norm)
        return {"ranks": ranks, "l1": l1, "length": length}

    def merge(self, name: str, base: Tensor, experts: Sequence[Tensor], group: dict[str, list[float]], stats: Any,
              seed: int, out: Tensor) -> None:
        k = len(experts)
        density = [float(x) for x in group["density"]]
        eps = [della_epsilon(name, d, float(e)) for d, e in zip(density, group["epsilon"])]
        denom = float(max(1, stats["length"] - 1))
        one = stats["length"] == 1  # one entry per row: mergekit's rank_norm is 0 / 0; kept with p = density
        # the keep probability a + rank * c: (density - epsilon) + rank_norm * 2 * epsilon
        probs = [(density[i], 0.0) if one else (density[i] - eps[i], 2 * eps[i] / denom) for i in range(k)]
        keys = [dare.tensor_key(seed, name, i) for i in range(k)]
        if self.fast():
            try:
                return self._merge_compiled(name, base, experts, group, stats, probs, keys, out)
            except Exception as e:  # noqa: BLE001 - any compiler failure: the eager passes compute the same
                self.fallback(e)
        self._merge_eager(name, base, experts, group, stats, probs, keys, out)

    def _numbers(self, group, stats, l1s: list[float | None], dt) -> tuple[list[float], list[float], bool]:
        """(rescale factors from the masked L1 norms (None: not rescaled), weights, normalize)."""
        scale = []
        for i, after in enumerate(l1s):
            before = stats["l1"][i]
            if after is None or before < 1e-7 or after < 1e-7:
                scale.append(1.0)
            else:
                scale.append(float(torch.tensor(before, dtype=dt) / torch.tensor(after, dtype=dt)))
        normalize = METHODS[self.method].normalize if self.normalize is None else self.normalize
        return scale, [float(w) for w in group["weight"]], normalize

    def _rescaled(self, group) -> list[bool]:
        density = [float(x) for x in group["density"]]
        masked = [0 < d < 1 for d in density]
        rescale = bool(self.options.get("rescale", True)) and any(masked)
        return [rescale and m for m in masked]

    def _merge_compiled(self, name, base, experts, group, stats, probs, keys, out) -> None:
        dt, dev, n = work_dtype(base), base.device, base.numel()
        b, es, o = _flat(base), [_flat(e) for e in experts], out.view(-1)
        k, density = len(es), [float(x) for x in group["density"]]
        kt = torch.tensor(keys, dtype=torch.int64, device=dev)
        offs = {off: torch.tensor(off, dtype=torch.int64, device=dev) for off, _ in _spans(n)}
        l1s: list[float | None] = [None] * k
        l1_pass = compiled(_della_l1)
        for i in (i for i, r in enumerate(self._rescaled(group)) if r):  # pass 1: the masked L1 norms
            p = torch.tensor(probs[i], dtype=dt, device=dev)
            acc = torch.zeros((), dtype=torch.float64, device=dev)
            for off, cnt in _spans(n):
                acc += l1_pass(b[off:off + cnt], es[i][off:off + cnt], _chunk(stats["ranks"][i], off, cnt, dev), p,
                               kt[i], offs[off])
            l1s[i] = float(acc)
        scale, weights, normalize = self._numbers(group, stats, l1s, dt)
        total = sum(weights)
        rows = []
        for i in range(k):
            a, c = probs[i] if 0 < density[i] < 1 else (2.0, 0.0)  # unmasked: every entry kept
            rows.append([a, c, 0.0 if density[i] <= 0 else scale[i] * weights[i], weights[i],
                         1.0 if abs(total) < 1e-8 else total])
        p = torch.tensor(rows, dtype=dt, device=dev)
        chunk = compiled(_della_chunk)
        for off, cnt in _spans(n):  # pass 2: generalized task arithmetic, one fused pass
            chunk(o[off:off + cnt], b[off:off + cnt], [e[off:off + cnt] for e in es],
                  [_chunk(r, off, cnt, dev) for r in stats["ranks"]], p, kt, offs[off], self.consensus, normalize)

    def _merge_eager(self, name, base, experts, group, stats, probs, keys, out) -> None:
        dt, dev, n = work_dtype(base), base.device, base.numel()
        b, es, o = _flat(base), [_flat(e) for e in experts], out.view(-1)
        k, density = len(es), [float(x) for x in group["density"]]
        masked = [0 < d < 1 for d in density]

        def keep(i: int, off: int, cnt: int) -> Tensor:
            a, c = probs[i]
            p = _chunk(stats["ranks"][i], off, cnt, dev).to(dt).mul_(c).add_(a)
            return uniform(keys[i], off, cnt, dev) < p

        l1s: list[float | None] = [None] * k
        packed: list[Tensor | None] = [None] * k
        for i in (i for i, r in enumerate(self._rescaled(group)) if r):  # pass 1: the masked L1 norms (the masks
            packed[i] = torch.empty((n + 7) // 8, dtype=torch.uint8, device=dev)  # kept, bit-packed)
            acc = torch.zeros((), dtype=torch.float64, device=dev)
            for off, cnt in _spans(n):
                m = keep(i, off, cnt)
                acc += (_tv(es[i][off:off + cnt], b[off:off + cnt], dt).abs_() * m).sum(dtype=torch.float64)
                packed[i][off // 8:(off + cnt + 7) // 8] = _pack(m)
            l1s[i] = float(acc)
        scale, weights, normalize = self._numbers(group, stats, l1s, dt)
        total = sum(weights)
        lin_div = 1.0 if abs(total) < 1e-8 else total
        for off, cnt in _spans(n):  # pass 2: generalized task arithmetic
            bc = b[off:off + cnt].to(dt)
            deltas = []
            for i in range(k):
                if density[i] <= 0:
                    deltas.append(torch.zeros_like(bc))
                    continue
                d = es[i][off:off + cnt].to(dt) - bc
                if masked[i]:
                    m = _unpack(packed[i][off // 8:(off + cnt + 7) // 8], cnt) if packed[i] is not None \
                        else keep(i, off, cnt)
                    d.mul_(m)
                deltas.append(d.mul_(scale[i] * weights[i]))  # mergekit's rescale, then its weight
            if self.consensus:
                sign = (sum(deltas[1:], deltas[0].clone()) >= 0).to(dt).mul_(2).sub_(1)  # the majority sign
                mixed, div = torch.zeros_like(bc), torch.zeros_like(bc)
                for d, w in zip(deltas, weights):
                    kept = (d * sign > 0).to(dt)  # d's sign is the majority's (zero entries never kept)
                    mixed.addcmul_(d, kept)
                    div.add_(kept, alpha=w)
                div[div == 0] = 1
            else:
                mixed, div = sum(deltas[1:], deltas[0].clone()), lin_div
            if normalize:
                mixed /= div
            o[off:off + cnt].copy_(bc + mixed)


class DellaLinear(Della):
    """DELLA's MagPrune without sign election (mergekit's `della_linear`)."""

    method = "della_linear"
    consensus = False


# SCE -------------------------------------------------------------------------------------------------------

def _sce_square(b: Tensor, es: list[Tensor], rank: Tensor, top: Tensor) -> Tensor:
    """One chunk's masked task vectors' sums of squares (experts,), in float64 (any summation order gives the
    same float32 weights)."""
    dt = torch.float64 if b.dtype == torch.float64 else torch.float32
    bc, m = b.to(dt), rank < top
    return torch.stack([((e.to(dt) - bc) * m).square().sum(dtype=torch.float64) for e in es])


def _sce_chunk(out: Tensor, b: Tensor, es: list[Tensor], rank: Tensor | None, top: Tensor, w: Tensor) -> None:
    """One chunk of sce's sign election and weighted mean, fused (rank None: every entry kept)."""
    dt = torch.float64 if b.dtype == torch.float64 else torch.float32
    bc = b.to(dt)
    tvs = [e.to(dt) - bc for e in es]
    if rank is not None:
        m = rank < top
        tvs = [t * m for t in tvs]
    total = tvs[0]
    for t in tvs[1:]:
        total = total + t
    sign = torch.where(total >= 0, 1.0, -1.0).to(dt)
    num, den = torch.zeros_like(bc), torch.zeros_like(bc)
    for i, t in enumerate(tvs):
        ew = (t * sign > 0).to(dt) * w[i]
        num = num + t * ew
        den = den + ew
    out.copy_(bc + num / den.clamp(min=1e-6))


class SCE(Compilable):
    """SCE (mergekit's `sce`): the top `select_topk` share of entries by variance across the experts, TIES sign
    election by sum, the experts weighted by their masked task vectors' mean squares (normalized)."""

    def prepare(self, name: str, base: Tensor, experts: Sequence[Tensor]) -> Any:
        dt, dev, n = work_dtype(base), base.device, base.numel()
        b, es = _flat(base), [_flat(e) for e in experts]
        var = torch.empty(n, dtype=dt, device=dev)
        sq = torch.zeros(len(es), dtype=torch.float64, device=dev)
        for off, cnt in _spans(n):
            tvs = torch.stack([_tv(e[off:off + cnt], b[off:off + cnt], dt) for e in es])
            var[off:off + cnt] = torch.var(tvs, dim=0, unbiased=False)
            sq += tvs.square().sum(dim=1, dtype=dt)
        nonzero = int(torch.count_nonzero(var))
        if dev.type == "cuda" and torch.cuda.mem_get_info(dev)[0] < 32 * n:  # the sort's temporaries: on the host
            var = var.cpu()
        order = torch.sort(var.abs(), descending=True, stable=True).indices
        del var
        rank = torch.empty(n, dtype=torch.int32, device=order.device)
        rank[order] = torch.arange(n, dtype=torch.int32, device=order.device)
        del order
        return {"rank": _host(rank, dev), "nonzero": nonzero, "mean_square": [s / n for s in sq.tolist()]}

    def merge(self, name: str, base: Tensor, experts: Sequence[Tensor], group: dict[str, list[float]], stats: Any,
              seed: int, out: Tensor) -> None:
        topk = float(group.get("select_topk", [1.0])[0])
        # the entries kept: rank < top, mergekit's int(count * share) (None: every entry)
        top = None if topk >= 1 else 0 if topk <= 0 else int(torch.tensor(stats["nonzero"]) * topk)
        if top == 0:  # every task vector masked out: the base
            out.view(-1).copy_(base.reshape(-1))
            return
        if self.fast():
            try:
                return self._merge_compiled(base, experts, stats, top, out)
            except Exception as e:  # noqa: BLE001 - any compiler failure: the eager passes compute the same
                self.fallback(e)
        self._merge_eager(base, experts, stats, top, out)

    @staticmethod
    def _weights(ms: list[float], dt) -> list[float]:
        w = torch.tensor(ms, dtype=dt)
        total = torch.sum(w).item()
        w = torch.ones_like(w) / w.shape[0] if abs(total) < 1e-6 else w / total
        return [float(x) for x in w]

    def _merge_compiled(self, base, experts, stats, top, out) -> None:
        dt, dev, n = work_dtype(base), base.device, base.numel()
        b, es, o = _flat(base), [_flat(e) for e in experts], out.view(-1)
        tt = torch.tensor(0 if top is None else top, dtype=torch.int32, device=dev)
        if top is None:
            ms = stats["mean_square"]
        else:
            acc, square = torch.zeros(len(es), dtype=torch.float64, device=dev), compiled(_sce_square)
            for off, cnt in _spans(n):  # the masked task vectors' mean squares
                acc += square(b[off:off + cnt], [e[off:off + cnt] for e in es], _chunk(stats["rank"], off, cnt, dev),
                              tt)
            ms = [s / n for s in acc.tolist()]
        w = torch.tensor(self._weights(ms, dt), dtype=dt, device=dev)
        chunk = compiled(_sce_chunk)
        for off, cnt in _spans(n):
            chunk(o[off:off + cnt], b[off:off + cnt], [e[off:off + cnt] for e in es],
                  None if top is None else _chunk(stats["rank"], off, cnt, dev), tt, w)

    def _merge_eager(self, base, experts, stats, top, out) -> None:
        dt, dev, n = work_dtype(base), base.device, base.numel()
        b, es, o = _flat(base), [_flat(e) for e in experts], out.view(-1)
        if top is None:
            ms = stats["mean_square"]
        else:
            acc = torch.zeros(len(es), dtype=torch.float64, device=dev)
            for off, cnt in _spans(n):  # the masked task vectors' mean squares
                m = _chunk(stats["rank"], off, cnt, dev) < top
                for i, e in enumerate(es):
                    acc[i] += (_tv(e[off:off + cnt], b[off:off + cnt], dt) * m).square_().sum(dtype=torch.float64)
            ms = [s / n for s in acc.tolist()]
        weights = self._weights(ms, dt)
        for off, cnt in _spans(n):
            bc = b[off:off + cnt].to(dt)
            tvs = [e[off:off + cnt].to(dt) - bc for e in es]
            if top is not None:
                m = _chunk(stats["rank"], off, cnt, dev) < top
                tvs = [t * m for t in tvs]
            sign = (sum(tvs[1:], tvs[0].clone()) >= 0).to(dt).mul_(2).sub_(1)  # the majority sign
            num, den = torch.zeros_like(bc), torch.zeros_like(bc)
            for t, wi in zip(tvs, weights):
                ew = (t * sign > 0).to(dt).mul_(wi)
                num.add_(t * ew)  # not addcmul_ (which may fuse the multiply-add): the compiled pass's rounding
                den.add_(ew)
            o[off:off + cnt].copy_(bc + num / den.clamp(min=1e-6))


# RAM -------------------------------------------------------------------------------------------------------

def _ram_chunk(es: Sequence[Tensor], b: Tensor, off: int, cnt: int, dt: torch.dtype, epsilon: float,
               lam: list[float] | None = None):
    """(base chunk, sum of the task vectors zeroed at |d| <= epsilon, the same sum weighted by lam (None: not
    computed), contributing experts per entry, each expert's contributing entries)."""
    bc = b[off:off + cnt].to(dt)
    acc, acc_lam = torch.zeros_like(bc), None if lam is None else torch.zeros_like(bc)
    counts, nzs = torch.zeros(cnt, dtype=torch.int32, device=b.device), []
    for i, e in enumerate(es):
        t = e[off:off + cnt].to(dt) - bc
        nz = t.abs() > epsilon
        t.mul_(nz)
        acc.add_(t)
        if acc_lam is not None:
            acc_lam.add_(t, alpha=lam[i])
        counts.add_(nz)
        nzs.append(nz)
    return bc, acc, acc_lam, counts, nzs


class RAM(TensorMethod):
    """RAM (mergekit's `ram`): entries changed (|d| > epsilon) by one expert taken whole, entries changed by
    several averaged over those experts. Candidate-independent: recomputed by each merge (one pass)."""

    def merge(self, name: str, base: Tensor, experts: Sequence[Tensor], group: dict[str, list[float]], stats: Any,
              seed: int, out: Tensor) -> None:
        self._merge(base, experts, float(self.options.get("epsilon", 1e-5)), None, out)

    def _merge(self, base: Tensor, experts: Sequence[Tensor], epsilon: float, lam: list[float] | None,
               out: Tensor) -> None:
        dt, n = work_dtype(base), base.numel()
        b, es, o = _flat(base), [_flat(e) for e in experts], out.view(-1)
        for off, cnt in _spans(n):
            bc, acc, acc_lam, counts, _ = _ram_chunk(es, b, off, cnt, dt, epsilon, lam)
            acc.div_(counts.clamp_(min=1))  # one contributor: its entry whole; several: their mean
            if acc_lam is not None:  # an entry of one contributor: scaled by its lambda
                acc = torch.where(counts == 1, acc_lam, acc)
            o[off:off + cnt].copy_(bc + acc)


class RAMPlusTL(RAM):
    """RAM+ tensor-local (mergekit's `ramplus_tl`): RAM with each expert's unique entries scaled by
    lambda_i = 1 + r * clamp(rho_i, 0, alpha), rho_i = the expert's shared / unique changed entries."""

    def prepare(self, name: str, base: Tensor, experts: Sequence[Tensor]) -> Any:
        dt, n, epsilon = work_dtype(base), base.numel(), float(self.options.get("epsilon", 1e-5))
        b, es = _flat(base), [_flat(e) for e in experts]
        shared = torch.zeros(len(es), dtype=torch.int64, device=b.device)
        unique = torch.zeros_like(shared)
        for off, cnt in _spans(n):
            *_, counts, nzs = _ram_chunk(es, b, off, cnt, dt, epsilon)
            nz = torch.stack(nzs)
            shared += (nz & (counts > 1)).sum(dim=1)
            unique += (nz & (counts == 1)).sum(dim=1)
        rho = shared.cpu() / unique.cpu().clamp(min=epsilon)  # float32, as mergekit
        return {"rho": rho}

    def merge(self, name: str, base: Tensor, experts: Sequence[Tensor], group: dict[str, list[float]], stats: Any,
              seed: int, out: Tensor) -> None:
        r = float(group.get("r", [0.1])[0])
        alpha = float(group.get("alpha", [0.2])[0])
        lam = 1 + r * stats["rho"].clamp(min=0, max=alpha)
        self._merge(base, experts, float(self.options.get("epsilon", 1e-5)), [float(x) for x in lam], out)


TASKVEC: dict[str, type[TensorMethod]] = {"della": Della, "della_linear": DellaLinear, "sce": SCE, "ram": RAM,
                                          "ramplus_tl": RAMPlusTL}
