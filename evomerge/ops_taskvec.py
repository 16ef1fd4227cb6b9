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


class Della(TensorMethod):
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
        dt, dev, n = work_dtype(base), base.device, base.numel()
        b, es, o = _flat(base), [_flat(e) for e in experts], out.view(-1)
        k = len(es)
        weights = [float(w) for w in group["weight"]]
        density = [float(x) for x in group["density"]]
        eps = [della_epsilon(name, d, float(e)) for d, e in zip(density, group["epsilon"])]
        rescale = bool(self.options.get("rescale", True))
        normalize = METHODS[self.method].normalize if self.normalize is None else self.normalize
        masked = [0 < d < 1 for d in density]
        keys = [dare.tensor_key(seed, name, i) for i in range(k)]
        denom = float(max(1, stats["length"] - 1))

        def keep(i: int, off: int, cnt: int) -> Tensor:
            if stats["length"] == 1:  # one entry per row: mergekit's rank_norm is 0 / 0; keep it with p = density
                p = torch.full((cnt,), density[i], dtype=dt, device=dev)
            else:  # (density - epsilon) + rank_norm * 2 * epsilon
                p = _chunk(stats["ranks"][i], off, cnt, dev).to(dt).mul_(2 * eps[i] / denom).add_(density[i] - eps[i])
            return uniform(keys[i], off, cnt, dev) < p

        scale = [1.0] * k
        packed: list[Tensor | None] = [None] * k
        if rescale and any(masked):  # pass 1: the masked task vectors' L1 norms (the masks kept, bit-packed)
            for i in (i for i in range(k) if masked[i]):
                packed[i] = torch.empty((n + 7) // 8, dtype=torch.uint8, device=dev)
                acc = torch.zeros((), dtype=torch.float64, device=dev)
                for off, cnt in _spans(n):
                    m = keep(i, off, cnt)
                    acc += (_tv(es[i][off:off + cnt], b[off:off + cnt], dt).abs_() * m).sum(dtype=dt)
                    packed[i][off // 8:(off + cnt + 7) // 8] = _pack(m)
                before, after = stats["l1"][i], float(acc)
                f32 = torch.tensor(before, dtype=dt) / torch.tensor(after, dtype=dt)
                scale[i] = 1.0 if before < 1e-7 or after < 1e-7 else float(f32)
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

class SCE(TensorMethod):
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
        dt, dev, n = work_dtype(base), base.device, base.numel()
        b, es, o = _flat(base), [_flat(e) for e in experts], out.view(-1)
        topk = float(group.get("select_topk", [1.0])[0])
        if topk >= 1:
            top, ms = None, stats["mean_square"]
        else:
            top = 0 if topk <= 0 else int(torch.tensor(stats["nonzero"]) * topk)  # mergekit's int(count * share)
            if top == 0:  # every task vector masked out: the base
                o.copy_(b)
                return
            acc = torch.zeros(len(es), dtype=torch.float64, device=dev)
            for off, cnt in _spans(n):  # the masked task vectors' mean squares
                m = _chunk(stats["rank"], off, cnt, dev) < top
                for i, e in enumerate(es):
                    acc[i] += (_tv(e[off:off + cnt], b[off:off + cnt], dt) * m).square_().sum(dtype=dt)
            ms = [s / n for s in acc.tolist()]
        w = torch.tensor(ms, dtype=dt)
        total = torch.sum(w).item()
        w = torch.ones_like(w) / w.shape[0] if abs(total) < 1e-6 else w / total
        weights = [float(x) for x in w]
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
                num.addcmul_(t, ew)
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
