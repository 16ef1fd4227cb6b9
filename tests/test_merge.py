"""Per-tensor merge operators against hand-computed results (mergekit's semantics)."""
import math

import pytest
import torch

from evomerge.merge import merge_tensor, outlier_mask

T = torch.tensor


def run(method, base, experts, **kw):
    out = torch.empty_like(base)
    ptr = out.data_ptr()
    res = merge_tensor(method, "layers.0.mlp.weight", base, experts, out, **kw)
    assert res is out and out.data_ptr() == ptr  # written in place
    return out


def test_linear_normalizes_by_default():
    e = [T([1.0, 2.0]), T([3.0, 4.0])]
    torch.testing.assert_close(run("linear", T([0.0, 0.0]), e, weights=[1, 3]), T([2.5, 3.5]))
    torch.testing.assert_close(run("linear", T([0.0, 0.0]), e, weights=[1, 3], normalize=False), T([10.0, 14.0]))


def test_task_arithmetic_adds_weighted_task_vectors():
    base, e = T([1.0, 1.0]), [T([2.0, 3.0]), T([0.0, 1.0])]
    torch.testing.assert_close(run("task_arithmetic", base, e, weights=[1, 0.5]), T([1.5, 3.0]))
    torch.testing.assert_close(run("task_arithmetic", base, e, weights=[1, 0.5], normalize=True),
                               base + T([0.5, 2.0]) / 1.5)


def test_ties_trims_elects_signs_and_takes_the_disjoint_mean():
    base = torch.zeros(4)
    e = [T([3.0, -1.0, 0.5, 2.0]), T([-2.0, -2.0, 1.0, 0.1])]
    # trimmed: [3, 0, 0, 2] and [-2, -2, 0, 0]; summed signs [+, -, 0 -> +, +]
    torch.testing.assert_close(run("ties", base, e, weights=[1, 1], density=[0.5, 0.5]), T([3.0, -2.0, 0.0, 2.0]))
    # unnormalized: the agreeing entries are summed
    torch.testing.assert_close(run("ties", base, e, weights=[1, 1], density=[1, 1], normalize=False),
                               T([3.0, -3.0, 1.5, 2.1]))


def test_dare_masks_are_seeded_per_tensor_and_rescaled():
    base, e = torch.zeros(10_000), [torch.ones(10_000)]
    a = run("dare_linear", base, e, density=[0.3], seed=7)
    b = run("dare_linear", base, e, density=[0.3], seed=7)
    torch.testing.assert_close(a, b)  # same recipe, same model
    values = a.unique().tolist()
    assert len(values) == 2 and values[0] == 0 and values[1] == pytest.approx(1 / 0.3)
    assert abs((a > 0).float().mean().item() - 0.3) < 0.02
    other = torch.empty_like(base)
    merge_tensor("dare_linear", "layers.1.mlp.weight", base, e, other, density=[0.3], seed=7)
    assert not torch.equal(a, other)  # another tensor draws another mask
    torch.testing.assert_close(run("dare_ties", base, e, density=[1.0]), torch.ones(10_000))


def test_breadcrumbs_drops_the_largest_and_the_smallest():
    d = torch.arange(1, 101, dtype=torch.float32)
    mask = outlier_mask(d, density=0.5, gamma=0.1)
    assert mask.sum() == 50 and mask[40:90].all() and not mask[:40].any() and not mask[90:].any()
    out = run("breadcrumbs", torch.zeros(100), [d], density=[0.5], gamma=[0.1])
    torch.testing.assert_close(out, d * mask)


def test_slerp_endpoints_midpoint_and_parallel_fallback():
    a, b = T([1.0, 0.0]), T([0.0, 1.0])
    torch.testing.assert_close(run("slerp", a, [b], t=0.0), a)
    torch.testing.assert_close(run("slerp", a, [b], t=1.0), b)
    h = math.sqrt(0.5)
    torch.testing.assert_close(run("slerp", a, [b], t=0.5), T([h, h]))
    torch.testing.assert_close(run("slerp", a, [2 * a], t=0.25), 1.25 * a)  # parallel: linear


def test_bad_methods_and_arities():
    with pytest.raises(ValueError, match="unknown merge method 'nope'"):
        run("nope", torch.zeros(2), [torch.ones(2)])
    with pytest.raises(ValueError, match="exactly one expert"):
        run("slerp", torch.zeros(2), [torch.ones(2), torch.ones(2)])
