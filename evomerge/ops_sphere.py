"""Per-tensor methods on the geometry of the models: nuslerp, multislerp, karcher, model_stock, nearswap and
arcee_fusion (mergekit 0.1.5's semantics; `tensormerge.TensorMethod`).

What does not depend on the candidate is computed once per run per tensor (`prepare`), so a candidate is a
few elementwise passes over the tensor's inputs:

- nuslerp: the angle between the two inputs (whole tensor, per row or per column), computed with mergekit's
  own float32 arithmetic; a candidate's t gives two coefficients (per row), so the merge is one weighted sum.
- multislerp: the inputs' Gram matrix (k x k, float64). mergekit's tangent-space step at the weighted mean is
  zero in exact arithmetic (sum_i w_i (u_i - (u_i . m) m) = 0 when m is the normalized weighted mean of the
  unit inputs u_i), so its result is m cos(eps) x sum_i w_i |x_i| up to rounding: a linear combination of the
  inputs whose coefficients follow from the Gram matrix and the weights.
- karcher: mergekit's iteration, run on the coefficients of the mean over the unit inputs (the mean stays in
  their span) with the float64 Gram matrix; the angles are taken in float32 as mergekit does, so the same
  inputs are skipped. The merged tensor is one weighted sum of the inputs (nothing is searched).
- model_stock: the mean cosine between the task vectors (whole tensor or per row: filter_wise) and so the
  interpolation ratio t, with mergekit's float32 arithmetic; the merge is mergekit's own expression (bitwise).
- nearswap: elementwise (mergekit's operations, in place), nothing to prepare.
- arcee_fusion: the rows' KL divergence and the importance threshold; the merge recomputes the mask
  elementwise. mergekit estimates the threshold's quantiles from a random sample (with replacement) of 1e6
  entries for larger tensors, so its result is random there; here the quantiles are exact (mergekit's index
  formula floor(q (n - 1)) over all entries), equal to mergekit's for tensors of up to 1e6 entries.

Inputs come in their checkpoint dtype; the arithmetic is float32 (float64 for float64 inputs), as mergekit
computes on float32 checkpoints (`dtype: float32`); float32 results agree with mergekit's within
1e-6 x (1 + |entry|) (tests/test_ops_sphere.py), bitwise for model_stock, nearswap and arcee_fusion.
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import torch

from .tensormerge import Tensor, TensorMethod, work_dtype

_CHUNK = 1 << 22  # entries per float64 chunk of a Gram matrix (x the number of inputs)


def _shares(a: Tensor, b: Tensor) -> bool:
    return a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()


def _gram(xs: Sequence[Tensor], center: Tensor | None = None) -> torch.Tensor:
    """The float64 Gram matrix (k x k, on the CPU) of the flattened tensors xs (minus `center`), accumulated in
    float64 chunk by chunk (no full-size float64 copy)."""
    flat = [x.reshape(-1) for x in xs]
    c = None if center is None else center.reshape(-1)
    n, k = flat[0].numel(), len(flat)
    step = max(1, _CHUNK // k)
    g = torch.zeros(k, k, dtype=torch.float64, device=flat[0].device)
    for s in range(0, n, step):
        rows = torch.stack([x[s:s + step].double() for x in flat])
        if c is not None:
            rows -= c[s:s + step].double()
        g += rows @ rows.T
    return g.cpu()


def _combine(xs: Sequence[Tensor], coefs: Sequence[float | Tensor], out: Tensor, dtype: torch.dtype,
             base: Tensor | None = None) -> None:
    """out = sum_i coefs_i x_i, or with a base base + sum_i coefs_i (x_i - base) (the task vectors'
    combination, added to the base) as (1 - sum_i coefs_i) base + sum_i coefs_i x_i: one pass per input.
    Coefficients are floats or tensors that broadcast against the tensor (one per vector); the arithmetic is
    in `dtype` (float32 / float64: a bf16 input is converted, not multiplied in bf16). The base form (half the
    passes of base + sum_i coefs_i (x_i - base)) rounds at the inputs' magnitude rather than the task vectors':
    float32 results stay within 1e-6 x (1 + |entry|) of mergekit's up to 16 experts (measured: 8e-7), far
    below a bf16 resident model's rounding."""
    terms = list(zip(xs, coefs))
    if base is not None:
        rest = 1 - sum(coefs) if all(isinstance(c, float) for c in coefs) else 1 - torch.stack(
            torch.broadcast_tensors(*[torch.as_tensor(c, dtype=dtype, device=out.device) for c in coefs])).sum(0)
        terms.insert(0, (base, rest))
    inputs = [x for x, _ in terms]
    direct = out.dtype == dtype and out.is_contiguous() and not any(_shares(out, x) for x in inputs)
    acc = out if direct else torch.empty(out.shape, dtype=dtype, device=out.device)
    (x0, c0), *others = terms
    if x0.dtype == dtype:
        torch.mul(x0, c0, out=acc)
    else:
        acc.copy_(x0).mul_(c0)
    for x, c in others:
        if isinstance(c, float):
            acc.add_(x, alpha=c)
        else:
            acc.addcmul_(x, c)
    if acc is not out:
        out.copy_(acc)


def _store(result: Tensor, out: Tensor) -> None:
    out.copy_(result)


class NuSlerp(TensorMethod):
    """mergekit's nuslerp: spherical interpolation of two experts (their task vectors with use_base) at
    t = w2 / (w1 + w2) (0.5 where |w1 + w2| < 1e-6), over the whole tensor (nuslerp_flatten), else per vector
    along the last dimension (per column with nuslerp_row_wise: mergekit's dim 0); colinear vectors are
    interpolated linearly."""

    def _layout(self, t: Tensor) -> Tensor:
        if self.options.get("nuslerp_flatten", True):
            return t.reshape(-1)
        return t.transpose(0, -1) if self.options.get("nuslerp_row_wise", False) and t.dim() > 1 else t

    def prepare(self, name: str, base: Tensor, experts: Sequence[Tensor]) -> Any:
        if len(experts) != 2:
            raise ValueError(f"nuslerp merges exactly 2 experts, got {len(experts)} (tensor {name})")
        dtype = work_dtype(base)
        v0, v1 = (e.to(dtype) for e in experts)
        if self.options.get("use_base", False):
            b = base.to(dtype)
            v0, v1 = v0 - b, v1 - b
        v0, v1 = self._layout(v0), self._layout(v1)
        # mergekit's own arithmetic (nuslerp(), eps 1e-8): the angle is candidate-independent
        u0 = v0 / torch.norm(v0, dim=-1, keepdim=True).clamp(min=1e-7)
        u1 = v1 / torch.norm(v1, dim=-1, keepdim=True).clamp(min=1e-7)
        cos_theta = torch.sum(u0 * u1, dim=-1, keepdim=True).clamp(-1, 1)
        del u0, u1
        colinear = (1 - cos_theta.square()) <= 1e-8 ** 2
        theta = torch.acos(torch.where(colinear, 0, cos_theta))
        return theta, torch.sin(theta), colinear

    def merge(self, name: str, base: Tensor, experts: Sequence[Tensor], group: dict[str, list[float]], stats: Any,
              seed: int, out: Tensor) -> None:
        theta, sin_theta, colinear = stats
        w = [float(v) for v in group["weight"]]
        total = sum(w)
        t = 0.5 if abs(total) < 1e-6 else w[1] / total
        c0 = torch.where(colinear, 1 - t, torch.sin((1 - t) * theta) / sin_theta)
        c1 = torch.where(colinear, t, torch.sin(t * theta) / sin_theta)
        use_base = self.options.get("use_base", False)
        if c0.numel() == 1:  # one angle: scalar coefficients (flattened, or one vector)
            _combine(experts, [float(c0), float(c1)], out, work_dtype(base), base if use_base else None)
            return
        # per-vector coefficients, back in the tensor's layout
        if self.options.get("nuslerp_row_wise", False) and out.dim() > 1:
            c0, c1 = c0.transpose(0, -1), c1.transpose(0, -1)
        _combine(experts, [c0, c1], out, work_dtype(base), base if use_base else None)


class MultiSlerp(TensorMethod):
    """mergekit's multislerp: barycentric interpolation of the experts (their task vectors with use_base) on
    the hypersphere, by the weights (normalized to sum 1 with normalize_weights); the result's norm is the
    weighted mean of the inputs' norms. One expert: the expert itself."""

    def prepare(self, name: str, base: Tensor, experts: Sequence[Tensor]) -> Any:
        if len(experts) < 2:
            return None
        g = _gram(experts, base if self.options.get("use_base", False) else None)
        return g, g.diagonal().clamp(min=0).sqrt()

    def coefficients(self, name: str, weights: Sequence[float], stats: Any, dtype: torch.dtype) -> list[float]:
        """The result's coefficients over the inputs (or their task vectors)."""
        g, norms = stats
        eps = float(self.options.get("eps", 1e-8))
        w = torch.tensor([float(v) for v in weights], dtype=dtype)  # mergekit's weights, in the tensors' dtype
        if self.options.get("normalize_weights", True):
            w = w / w.sum()
        w = w.double()
        scale = w / (norms + eps)  # the weights of the unit vectors
        mean_norm = float((scale @ g @ scale).clamp(min=0).sqrt())
        if mean_norm < eps:  # (NaN weights, e.g. normalized weights summing to 0, give NaN, as in mergekit)
            if len(w) == 2:  # mergekit's fallback: linear interpolation
                return [float(x) for x in w]
            raise ValueError(
                f"multislerp: tensor {name}: the weighted sum of the input tensors is zero (antipodal "
                "vectors or sets of vectors whose weights exactly balance out, e.g. a, -a with equal "
                "weights); try different weights")
        avg_norm = float((norms * w).sum())
        factor = avg_norm * math.cos(eps) / mean_norm  # exp map of the (zero) tangent: cos(|0| + eps)
        return [float(x) * factor for x in scale]

    def merge(self, name: str, base: Tensor, experts: Sequence[Tensor], group: dict[str, list[float]], stats: Any,
              seed: int, out: Tensor) -> None:
        if len(experts) == 1:
            out.copy_(experts[0])
            return
        coefs = self.coefficients(name, group["weight"], stats, work_dtype(base))
        _combine(experts, coefs, out, work_dtype(base), base if self.options.get("use_base", False) else None)


def karcher_coefficients(g: torch.Tensor, alphas: Sequence[float], max_iter: int = 10, tol: float = 1e-5,
                         dtype: torch.dtype = torch.float32) -> list[float]:
    """mergekit's karcher_merge_tensors as coefficients over its inputs, from their float64 Gram matrix `g`:
    the weighted Karcher mean on the unit hypersphere (the mean is kept as coefficients over the unit inputs),
    scaled by the weighted sum of the inputs' norms. Angles are mergekit's float32 (`dtype`) arccos of the
    clamped dot products, so the inputs it skips (angle < tol) are skipped here."""
    k = g.shape[0]
    norms = [math.sqrt(max(float(g[i, i]), 0.0)) for i in range(k)]
    valid = [i for i in range(k) if norms[i] > tol]
    coefs = [0.0] * k
    if not valid:
        return coefs
    gu = torch.tensor([[float(g[i, j]) / (norms[i] * norms[j]) for j in valid] for i in valid], dtype=torch.float64)
    a_sum = sum(alphas[i] for i in valid)
    a = torch.tensor([alphas[i] / a_sum for i in valid], dtype=torch.float64)

    def norm(c: torch.Tensor) -> float:
        return math.sqrt(max(float(c @ gu @ c), 0.0))

    c = a.clone()
    mean_norm = norm(c)
    if mean_norm < tol:
        c = torch.zeros_like(a)
        c[0] = 1.0
    else:
        c = c / mean_norm
    for _ in range(max_iter):
        dots = (gu @ c).clamp(-1.0, 1.0)
        theta = torch.arccos(dots.to(dtype)).double()  # mergekit's float32 angles
        tau = torch.where(theta < tol, 0.0, a * theta / torch.sin(theta))
        tangent = tau - (tau @ dots) * c  # sum_i tau_i (u_i - dot_i mean)
        tn = norm(tangent)
        if tn < tol:
            break
        c = math.cos(tn) * c + math.sin(tn) * (tangent / tn)
        unit = norm(c)
        if unit > tol:
            c = c / unit
    scale = sum(alpha * n for alpha, n in zip(alphas, norms))
    for j, i in enumerate(valid):
        coefs[i] = scale * float(c[j]) / norms[i]
    return coefs


class Karcher(TensorMethod):
    """mergekit's karcher: the Riemannian mean of the experts (and the base, last, with use_base: mergekit's
    base_model is one of the averaged models) on the unit hypersphere, equal weights, scaled by their mean
    norm. Nothing is searched: the merged tensor is one weighted sum of the inputs, prepared once."""

    def _inputs(self, base: Tensor, experts: Sequence[Tensor]) -> list[Tensor]:
        return [*experts, base] if self.options.get("use_base", False) else list(experts)

    def prepare(self, name: str, base: Tensor, experts: Sequence[Tensor]) -> Any:
        xs = self._inputs(base, experts)
        if len(xs) == 1:
            return None
        return karcher_coefficients(_gram(xs), [1.0 / len(xs)] * len(xs), int(self.options.get("max_iter", 10)),
                                    float(self.options.get("tol", 1e-5)), work_dtype(base))

    def merge(self, name: str, base: Tensor, experts: Sequence[Tensor], group: dict[str, list[float]], stats: Any,
              seed: int, out: Tensor) -> None:
        xs = self._inputs(base, experts)
        if stats is None:
            out.copy_(xs[0])
            return
        _combine(xs, stats, out, work_dtype(base))


class ModelStock(TensorMethod):
    """mergekit's model_stock: the experts' average pulled towards the base by t = k cos / (1 + (k - 1) cos),
    cos the mean cosine between the task vectors (whole tensors, or per row with filter_wise); the base where
    the denominator vanishes. Nothing is searched: t is prepared once."""

    def _shape(self, base: Tensor) -> tuple[int, ...]:
        """mergekit's layout of the tensors: flattened, or (filter_wise) as they are, a 1-D tensor as one row."""
        if not self.options.get("filter_wise", False):
            return (-1,)
        return tuple(base.shape) if base.dim() > 1 else (1, -1)

    def prepare(self, name: str, base: Tensor, experts: Sequence[Tensor]) -> Any:
        k = len(experts)
        if k < 2:
            raise ValueError(f"model_stock merges at least 2 experts with the base, got {k} (tensor {name})")
        # mergekit's own float32 arithmetic, two task vectors at a time (not k full-size ones at once)
        dtype, shape = work_dtype(base), self._shape(base)
        w0 = base.to(dtype).reshape(shape)

        def offset(i: int) -> Tensor:
            return experts[i].to(dtype).reshape(shape) - w0

        norms = [torch.norm(offset(i), dim=-1) for i in range(k)]
        cos_thetas = []
        for i in range(k):
            a = offset(i)
            for j in range(i + 1, k):
                norm_product = norms[i] * norms[j]
                cos_thetas.append(((a * offset(j)).sum(dim=-1) / norm_product.clamp(min=1e-6)).clamp(-1, 1))
        cos_theta = torch.stack(cos_thetas).mean(dim=0).unsqueeze(-1)
        denominator = 1 + (k - 1) * cos_theta
        singular = denominator.abs() < 1e-6
        safe = torch.where(singular, torch.ones_like(denominator), denominator)
        return torch.where(singular, torch.zeros_like(cos_theta), (k * cos_theta) / safe)

    def merge(self, name: str, base: Tensor, experts: Sequence[Tensor], group: dict[str, list[float]], stats: Any,
              seed: int, out: Tensor) -> None:
        t, dtype, shape = stats, work_dtype(base), self._shape(base)
        w0 = base.to(dtype).reshape(shape)
        average = sum(e.to(dtype).reshape(shape) for e in experts) / len(experts)
        _store((t * average + (1 - t) * w0).reshape(out.shape), out)


_COMPILED: dict[str, Any] = {}
_FAILED: list[str] = []  # the first compile failure of the process (then every merge is eager)


def _nearswap(out: Tensor, base: Tensor, expert: Tensor, t: Tensor) -> None:
    """nearswap in mergekit's operations (t / x is reciprocal(x) x t): the eager pass, and the fused one
    when compiled."""
    dtype = torch.float64 if base.dtype == torch.float64 else torch.float32
    a, b = base.to(dtype), expert.to(dtype)
    weight = (torch.reciprocal((a - b).abs().clamp(min=1e-6)) * t).clamp(min=0, max=1)
    out.copy_(weight * b + (1 - weight) * a)


class NearSwap(TensorMethod):
    """mergekit's nearswap: base + min(1, t / |expert - base|) x (expert - base) as mergekit writes it
    (weight x expert + (1 - weight) x base, |difference| clamped at 1e-6). `compiled` (set by the runtime
    where compiling pays, as for the slice kernels): one fused pass (torch.compile), the eager pass's bits; if
    compiling fails the first merge says so once and every merge of the process is eager."""

    compiled = False

    def merge(self, name: str, base: Tensor, experts: Sequence[Tensor], group: dict[str, list[float]], stats: Any,
              seed: int, out: Tensor) -> None:
        if len(experts) != 1:
            raise ValueError(f"nearswap merges the base with exactly 1 expert, got {len(experts)} (tensor {name})")
        t = float(group["t"][0])
        if self.compiled and not _FAILED:
            try:
                if "nearswap" not in _COMPILED:
                    _COMPILED["nearswap"] = torch.compile(_nearswap, dynamic=True)
                tt = torch.tensor(t, dtype=work_dtype(base), device=base.device)
                _COMPILED["nearswap"](out, base, experts[0], tt)
                return
            except Exception as e:  # noqa: BLE001 - any compiler failure: the eager pass computes the same
                import sys

                first = (str(e).strip().splitlines() or [""])[0][:200]
                _FAILED.append(first)
                print(f"warning: NearSwap: compiling the merge failed ({type(e).__name__}: {first}); merging "
                      f"eagerly", file=sys.stderr)
        dtype = work_dtype(base)
        a, b = base.to(dtype), experts[0].to(dtype)
        # mergekit's operations (t / x is reciprocal(x) x t), in place: the same float32 results
        weight = torch.sub(a, b).abs_().clamp_(min=1e-6).reciprocal_().mul_(t).clamp_(min=0, max=1)
        result = torch.mul(weight, b)
        result.add_(weight.neg_().add_(1).mul_(a))
        _store(result, out)


class ArceeFusion(TensorMethod):
    """mergekit's arcee_fusion: the base, with the expert's entries where |expert - base| x the row's KL
    divergence (softmax of the expert's row against the base's) reaches median + 1.5 IQR of these importances.
    The quantiles are exact (mergekit samples 1e6 entries of larger tensors at random)."""

    def prepare(self, name: str, base: Tensor, experts: Sequence[Tensor]) -> Any:
        if len(experts) != 1:
            raise ValueError(f"arcee_fusion merges the base with exactly 1 expert, got {len(experts)} "
                             f"(tensor {name})")
        dtype = work_dtype(base)
        b, e = base.to(dtype), experts[0].to(dtype)
        p = torch.softmax(e, dim=-1) + 1e-8
        q = torch.softmax(b, dim=-1) + 1e-8
        kl = torch.sum(p * torch.log(p / q), dim=-1, keepdim=True)
        del p, q
        importance = (e - b).abs() * kl
        flat = importance.reshape(-1)
        n = flat.numel()
        q1, median, q3 = (torch.kthvalue(flat, int(q * (n - 1)) + 1).values for q in (0.25, 0.5, 0.75))
        return kl, median + 1.5 * (q3 - q1)

    def merge(self, name: str, base: Tensor, experts: Sequence[Tensor], group: dict[str, list[float]], stats: Any,
              seed: int, out: Tensor) -> None:
        kl, threshold = stats
        dtype = work_dtype(base)
        b = base.to(dtype)
        diff = experts[0].to(dtype) - b
        mask = diff.abs().mul_(kl).ge_(threshold)  # (importance >= threshold), as 1.0 / 0.0
        _store(diff.mul_(mask).add_(b), out)


SPHERE: dict[str, type[TensorMethod]] = {
    "nuslerp": NuSlerp, "multislerp": MultiSlerp, "karcher": Karcher, "model_stock": ModelStock,
    "nearswap": NearSwap, "arcee_fusion": ArceeFusion,
}
