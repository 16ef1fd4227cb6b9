"""The geometric per-tensor methods (ops_sphere.py) against mergekit 0.1.5's own per-tensor functions, called
in process: nuslerp, multislerp, karcher, model_stock, nearswap, arcee_fusion; and through an hf_merge space."""
import importlib

import numpy as np
import pytest
import torch
from mergekit.merge_methods.base import PerInputValues, TensorGroup
from safetensors.torch import load_file

from evomerge.merge import merge_tensor
from evomerge.methods import METHODS
from evomerge.ops_sphere import SPHERE
from evomerge.spaces.hf_merge import HFMergeSpace, HFMergeSpaceConfig

from hf_models import tiny_family

MK = {m: importlib.import_module(f"mergekit.merge_methods.{m}")
      for m in ("nuslerp", "multislerp", "karcher", "model_stock", "nearswap", "arcee_fusion")}
SHAPES = [(17,), (6, 9), (2, 3, 5)]


def close(got, want):
    """float32 agreement within 1e-6 (relative to the entries' size: |d| <= 1e-6 (1 + |want|))."""
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


def inputs(shape, k, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=g)
    return base.to(dtype), [(base + 0.5 * torch.randn(shape, generator=g)).to(dtype) for _ in range(k)]


def group(base, experts, with_base):
    """mergekit's TensorGroup: the experts, and the base last when mergekit's base_model is set."""
    tensors = [*experts, base] if with_base else list(experts)
    return TensorGroup.from_tensors(tensors, base_index=len(experts) if with_base else None, name="t")


def per_model(values):
    return PerInputValues(list(enumerate(values)))


def ours(method, base, experts, values=None, out=None, **options):
    impl = SPHERE[method]({**dict(METHODS[method].options), **options}, len(experts))
    out = torch.empty(base.shape, dtype=base.dtype) if out is None else out
    impl.merge("t", base, experts, values or {}, impl.prepare("t", base, experts), 0, out)
    return out


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("use_base", [False, True])
@pytest.mark.parametrize("flatten,row_wise", [(True, False), (False, False), (False, True)])
def test_nuslerp_equals_mergekit(shape, use_base, flatten, row_wise):
    base, experts = inputs(shape, 2, seed=len(shape))
    w = [0.3, 0.9]
    want = MK["nuslerp"].nuslerp_merge_method.merge_group(group(base, experts, use_base), weight=per_model(w),
                                                          nuslerp_flatten=flatten, nuslerp_row_wise=row_wise)
    close(ours("nuslerp", base, experts, {"weight": w}, use_base=use_base, nuslerp_flatten=flatten,
               nuslerp_row_wise=row_wise), want)


@pytest.mark.parametrize("flatten", [True, False])
def test_nuslerp_edge_cases_follow_mergekit(flatten):
    base, (a, _) = inputs((4, 6), 2)
    nu = MK["nuslerp"].nuslerp_merge_method
    # colinear inputs (per row too: every row of 2a is colinear with a's) interpolate linearly
    for w in ([0.2, 0.6], [1.0, -1.0]):  # the second sums to 0: t = 0.5
        want = nu.merge_group(group(base, [a, 2 * a], False), weight=per_model(w), nuslerp_flatten=flatten)
        got = ours("nuslerp", base, [a, 2 * a], {"weight": w}, nuslerp_flatten=flatten)
        close(got, want)
    close(ours("nuslerp", base, [a, 2 * a], {"weight": [1.0, -1.0]}), 1.5 * a)
    with pytest.raises(ValueError, match="exactly 2 experts"):
        ours("nuslerp", base, [a], {"weight": [1.0]})


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("k", [2, 3, 4])
@pytest.mark.parametrize("use_base", [False, True])
@pytest.mark.parametrize("normalize_weights", [True, False])
def test_multislerp_equals_mergekit(shape, k, use_base, normalize_weights):
    base, experts = inputs(shape, k, seed=k)
    w = torch.rand(k, generator=torch.Generator().manual_seed(k)).add(0.1).tolist()
    want = MK["multislerp"].multislerp.merge_group(group(base, experts, use_base), weight=per_model(w),
                                                   normalize_weights=normalize_weights)
    close(ours("multislerp", base, experts, {"weight": w}, use_base=use_base, normalize_weights=normalize_weights),
          want)


@pytest.mark.parametrize("use_base", [False, True])
def test_multislerp_of_16_experts_equals_mergekit(use_base):
    base, experts = inputs((6, 9), 16, seed=16)
    w = torch.rand(16, generator=torch.Generator().manual_seed(16)).tolist()
    want = MK["multislerp"].multislerp.merge_group(group(base, experts, use_base), weight=per_model(w))
    close(ours("multislerp", base, experts, {"weight": w}, use_base=use_base), want)


def test_multislerp_edge_cases_follow_mergekit():
    ms = MK["multislerp"].multislerp
    base, (a, b) = inputs((5, 7), 2)
    # one expert: the expert itself (with or without the base)
    close(ours("multislerp", base, [a], {"weight": [0.4]}, use_base=True), a)
    # antipodal inputs with equal weights: two of them interpolate linearly, more are an error naming the tensor
    w = [0.5, 0.5]
    want = ms.merge_group(group(base, [a, -a], False), weight=per_model(w))
    close(ours("multislerp", base, [a, -a], {"weight": w}), want)
    with pytest.raises(ValueError, match="weighted sum"):
        ms.merge_group(group(base, [a, -a, b - b], False), weight=per_model([0.5, 0.5, 0.0]))
    with pytest.raises(ValueError, match="tensor t: the weighted sum"):
        ours("multislerp", base, [a, -a, b - b], {"weight": [0.5, 0.5, 0.0]})
    # a different eps
    want = ms.merge_group(group(base, [a, b], True), weight=per_model([0.2, 0.7]), eps=1e-3)
    close(ours("multislerp", base, [a, b], {"weight": [0.2, 0.7]}, use_base=True, eps=1e-3), want)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("k", [1, 2, 3, 4])
@pytest.mark.parametrize("use_base", [False, True])
def test_karcher_equals_mergekit(shape, k, use_base):
    base, experts = inputs(shape, k, seed=10 + k)
    want = MK["karcher"].karcher_merge_method.merge_group(group(base, experts, use_base))
    close(ours("karcher", base, experts, use_base=use_base), want)


def test_karcher_options_and_degenerate_inputs_follow_mergekit():
    km = MK["karcher"].karcher_merge_method
    base, experts = inputs((8, 8), 3, seed=3)
    for max_iter, tol in ((1, 1e-5), (3, 1e-2), (50, 1e-7)):
        want = km.merge_group(group(base, experts, True), max_iter=max_iter, tol=tol)
        close(ours("karcher", base, experts, use_base=True, max_iter=max_iter, tol=tol), want)
    # a zero input (no direction) and nearly identical inputs (angles under tol are skipped)
    for xs in ([experts[0], torch.zeros_like(base), experts[1]], [base, base + 1e-7 * experts[0], experts[1]]):
        close(ours("karcher", base, xs), km.merge_group(group(base, xs, False)))


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("k", [2, 3, 4])
@pytest.mark.parametrize("filter_wise", [False, True])
def test_model_stock_equals_mergekit(shape, k, filter_wise):
    base, experts = inputs(shape, k, seed=20 + k)
    want = MK["model_stock"].model_stock_merge_method.merge_group(group(base, experts, True), filter_wise=filter_wise)
    close(ours("model_stock", base, experts, filter_wise=filter_wise), want)


def test_model_stock_singular_denominator_keeps_the_base():
    base, (a,) = inputs((3, 4), 1)
    experts = [base + (a - base), base - (a - base)]  # opposite task vectors: 1 + (k - 1) cos = 0
    want = MK["model_stock"].model_stock_merge_method.merge_group(group(base, experts, True))
    close(ours("model_stock", base, experts), want)
    close(want, base)
    with pytest.raises(ValueError, match="at least 2 experts"):
        ours("model_stock", base, [a])


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("t", [0.0, 0.3, 5.0])
def test_nearswap_equals_mergekit(shape, t):
    base, experts = inputs(shape, 1, seed=30)
    want = MK["nearswap"].nearswap_merge.merge_group(group(base, experts, True), t=t)
    torch.testing.assert_close(ours("nearswap", base, experts, {"t": [t]}), want, rtol=0, atol=0)


@pytest.mark.parametrize("shape", [*SHAPES, (40, 50)])
def test_arcee_fusion_equals_mergekit(shape):
    base, experts = inputs(shape, 1, seed=40)
    experts[0].view(-1)[::7] += 3.0  # a few large changes pass the threshold
    want = MK["arcee_fusion"].arcee_fusion_merge_method.merge_group(group(base, experts, True))
    got = ours("arcee_fusion", base, experts)
    torch.testing.assert_close(got, want, rtol=0, atol=0)  # exact quantiles: mergekit's below 1e6 entries
    assert (got == experts[0]).any() and (got == base).any()


def test_half_precision_inputs_are_merged_in_float32_and_out_may_alias_an_input():
    base, experts = inputs((6, 10), 3, seed=50, dtype=torch.bfloat16)
    w = [0.2, 0.5, 0.3]
    want = MK["multislerp"].multislerp.merge_group(group(base.float(), [e.float() for e in experts], True),
                                                   weight=per_model(w))
    got = ours("multislerp", base, experts, {"weight": w}, use_base=True)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got, want.to(torch.bfloat16), rtol=0, atol=0)
    b32, e32 = inputs((6, 10), 3, seed=51)
    want = ours("karcher", b32, e32, use_base=True)
    alias = b32.clone()
    close(ours("karcher", alias, e32, out=alias, use_base=True), want)  # out is the base's own storage


# through the product: an hf_merge space of each method materializes merge_tensor's tensors ---------------------

@pytest.fixture(scope="module")
def family(tmp_path_factory):
    root = tmp_path_factory.mktemp("sphere")
    return root, *tiny_family(root)


CASES = [("nuslerp", 2, {}), ("nuslerp", 2, {"use_base": True, "nuslerp_flatten": False}),
         ("multislerp", 3, {"use_base": True}), ("multislerp", 3, {"normalize_weights": False}),
         ("nearswap", 1, {}), ("karcher", 3, {"use_base": True}), ("model_stock", 3, {"filter_wise": True}),
         ("arcee_fusion", 1, {})]


@pytest.mark.parametrize("method,k,options", CASES)
def test_hf_space_materializes_merge_tensor(family, method, k, options):
    root, base_dir, experts = family
    labels = list(experts)[:k]
    models = {"base": str(base_dir), "experts": {lbl: str(experts[lbl]) for lbl in labels}}
    if METHODS[method].params:
        s = HFMergeSpace(HFMergeSpaceConfig(name="hf_merge", models=models, method=method, options=options,
                                            cache_dir=str(root / "tv")), seed=0)
        x = np.random.default_rng(k).uniform(s.lower, s.upper)
        recipe = s.decode(x)
    else:
        # nothing to search (the space refuses such a method): the runtime of a space whose method is swapped
        s = HFMergeSpace(HFMergeSpaceConfig(name="hf_merge", models=models, method="multislerp" if k > 1 else
                                            "nearswap", cache_dir=str(root / "tv")), seed=0)
        cfg = HFMergeSpaceConfig(name="hf_merge", models=models, method=method, options=options,
                                 cache_dir=str(root / "tv"))
        s.cfg, s.options = cfg, {**dict(METHODS[method].options), **options}
        recipe = s.recipe_of({g: {} for g in s.groups})
    model = s.open_runtime("cpu").materialize(recipe)
    base = load_file(str(base_dir / "model.safetensors"))
    ex = [load_file(str(experts[lbl] / "model.safetensors")) for lbl in labels]
    merged = dict(model.named_parameters())
    checked = 0
    for name, p in merged.items():
        g = recipe["groups"][s.tensor_group[name]]
        want = merge_tensor(method, name, base[name], [e[name] for e in ex], torch.empty_like(base[name]),
                            params=g, options=options)
        assert torch.isfinite(p).all()
        torch.testing.assert_close(p.detach(), want, rtol=0, atol=0)
        checked += 1
    assert checked == len(base)


def test_nearswap_compiled_equals_eager():
    """nearswap compiled (one fused pass) gives the eager pass's tensors, to the bit (float32 and bfloat16)."""
    pytest.importorskip("torch._inductor")
    from evomerge import ops_sphere

    g = torch.Generator().manual_seed(0)
    for shape, dtype in (((48, 40), torch.float32), ((300,), torch.bfloat16)):
        base = torch.randn(shape, generator=g).to(dtype)
        expert = (base.float() + 0.01 * torch.randn(shape, generator=g)).to(dtype)
        impl = ops_sphere.NearSwap({}, 1)
        for t in (0.001, 0.5):
            a, b = torch.empty_like(base), torch.empty_like(base)
            impl.compiled = False
            impl.merge("t", base, [expert], {"t": [t]}, None, 0, a)
            impl.compiled = True
            impl.merge("t", base, [expert], {"t": [t]}, None, 0, b)
            assert torch.equal(a, b), (shape, dtype, t)
    assert not ops_sphere._FAILED
