"""The search runs' merge path (kernels.py, inputs.py): the same tensors as the reference operators
(merge.py, whose masks select per call), streamed or resident, eager or compiled."""
import numpy as np
import pytest
import torch

from evomerge import kernels as K
from evomerge.dare import tensor_key, uniform
from evomerge.spaces.hf_merge import HFMergeSpace, HFMergeSpaceConfig
from evomerge.inputs import MergeInputs
from evomerge.merge import magnitude_mask, merge_tensor, outlier_mask

from hf_models import tiny_family

METHODS = ("task_arithmetic", "ties", "dare_ties", "dare_linear", "breadcrumbs", "breadcrumbs_ties", "linear")
GROUP = {"weight": [0.3, -0.6, 0.2], "density": [0.3, 0.5, 0.9], "gamma": [0.01, 0.05, 0.0]}


def reference(method, base, experts, deltas, normalize, seed=5):
    kw = dict(weights=GROUP["weight"], normalize=normalize, seed=seed)
    if method not in ("linear", "task_arithmetic"):
        kw["density"] = GROUP["density"]
    if method.startswith("breadcrumbs"):
        kw["gamma"] = GROUP["gamma"]
    out = torch.empty(base.shape)
    return merge_tensor(method, "w", base.float(), [e.float() for e in experts], out,
                        deltas=[d.float() for d in deltas], **kw)


def family_tensors(dtype, n=6000, ties=False):
    g = torch.Generator().manual_seed(0)
    base = (torch.randn(n, generator=g) * 0.02).to(dtype)
    experts = [(base.float() + torch.randn(n, generator=g) * 0.01).to(dtype) for _ in range(3)]
    if ties:  # many equal magnitudes (as in bf16 task vectors)
        experts = [(base.float() + torch.randint(-4, 5, (n,), generator=g) * 0.01).to(dtype) for _ in range(3)]
    deltas = [(e.float() - base.float()).to(dtype) for e in experts]
    return base, experts, deltas


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("ties", [False, True])
def test_precomputed_selection_equals_per_call_selection(dtype, ties):
    base, experts, deltas = family_tensors(dtype, ties=ties)
    tables = [K.MagnitudeTable.of(d) for d in deltas]
    for density in (1e-6, 0.1, 0.37, 0.5, 0.99, 1.0):
        for d, t in zip(deltas, tables):
            lo, hi = K.ties_bounds(t, density)
            a = d.float().abs()
            assert torch.equal(((a >= lo) & (a <= hi)).float(), magnitude_mask(d.float(), density))
            for gamma in (0.0, 0.01, 0.3, 0.9):
                lo, hi = K.breadcrumbs_bounds(t, density, gamma)
                assert torch.equal(((a >= lo) & (a <= hi)).float(), outlier_mask(d.float(), density, gamma))
    for method in METHODS:
        for normalize in (None, True, False):
            spec = K.spec_for(method, 3, normalize)
            p = torch.tensor(K.slice_params(spec, GROUP, tables), dtype=torch.float32)
            keys = torch.tensor([tensor_key(5, "w", i) for i in range(3)])
            out = torch.empty(base.shape)
            K._slice_kernel(spec, out, base, experts if method == "linear" else deltas, p, torch.tensor(0), keys)
            want = reference(method, base, experts, deltas, normalize)
            if method == "linear":  # merge.linear accumulates with fused multiply-adds
                torch.testing.assert_close(out, want, rtol=1e-6, atol=1e-7)
            else:
                assert torch.equal(out, want), (method, normalize)


def test_ties_at_the_threshold_are_kept():
    d = torch.tensor([3.0, -1.0, 1.0, 2.0, 1.0, -0.5])
    # k = 3: 3, 2 and the 1's tied with the third largest
    assert magnitude_mask(d, 0.5).tolist() == [1, 1, 1, 1, 1, 0]
    lo, hi = K.ties_bounds(K.MagnitudeTable.of(d), 0.5)
    assert (lo, hi) == (1.0, float("inf"))


def test_dare_draw_is_the_same_for_slices_and_devices_of_one_tensor():
    key = tensor_key(3, "model.layers.0.mlp.up_proj.weight", 1)
    whole = uniform(key, 0, 10_000, "cpu")
    parts = torch.cat([uniform(key, off, 1000, "cpu") for off in range(0, 10_000, 1000)])
    assert torch.equal(whole, parts) and 0 <= float(whole.min()) and float(whole.max()) < 1
    assert abs(float((whole < 0.3).float().mean()) - 0.3) < 0.02
    assert not torch.equal(whole, uniform(tensor_key(3, "model.layers.0.mlp.up_proj.weight", 2), 0, 10_000, "cpu"))


def test_streamed_slices_equal_resident_tensors():
    base, experts, deltas = family_tensors(torch.bfloat16, n=50_000)
    sources = {"a": [base, *deltas], "b": [base[:777], *[d[:777] for d in deltas]]}
    resident = MergeInputs(sources, {n: ["device"] * 4 for n in sources}, torch.device("cpu"), 1 << 20)
    streamed = MergeInputs(sources, {"a": ["host", "disk", "host", "host"], "b": ["device"] * 4},
                           torch.device("cpu"), 4096 * 2)  # 4096 bf16 elements per slice
    got = {}
    for u in streamed.units():
        assert u.staged == (u.name == "a") and u.n <= 4096
        got.setdefault(u.name, []).append([v.clone() for v in u.views])
    assert len(got["a"]) == 13 and streamed.transfer_s is not None and resident.transfer_s is None
    for name, pieces in got.items():
        for i in range(4):
            assert torch.equal(torch.cat([p[i] for p in pieces]), sources[name][i])
    assert [u.n for u in resident.units()] == [50_000, 777]


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    root = tmp_path_factory.mktemp("fam")
    return root, *tiny_family(root)


def runtime(family, method, **kw):
    root, base, experts = family
    if method == "slerp":
        experts = {"a": experts["a"]}
    cfg = HFMergeSpaceConfig(name="hf_merge", method=method, cache_dir=str(root / "tv"),
                             models={"base": str(base), "experts": {k: str(v) for k, v in experts.items()}}, **kw)
    s = HFMergeSpace(cfg, seed=3)
    return s, s.open_runtime("cpu")


@pytest.mark.parametrize("method", [*METHODS, "slerp"])
def test_streaming_runtime_is_bit_identical_to_the_resident_runtime(family, method):
    s, resident = runtime(family, method)
    _, streaming = runtime(family, method, memory={"budget_gib": 0.0002})  # the model fits, its inputs do not
    assert all(t == "device" for t in resident.plan.tiers.values())
    assert resident.plan.streamed_bytes == 0 and streaming.plan.streamed_bytes > 0
    x = np.random.default_rng(0).uniform(s.lower, s.upper)
    a = {n: t.detach().clone() for n, t in resident.materialize(s.decode(x)).state_dict().items()}
    b = streaming.materialize(s.decode(x)).state_dict()
    assert streaming.last_transfer_s is not None and resident.last_transfer_s is None
    assert all(torch.equal(a[n], b[n]) for n in a)


def test_compiled_kernel_equals_the_eager_kernel():
    pytest.importorskip("torch._inductor")
    base, experts, deltas = family_tensors(torch.bfloat16, n=4096)
    tables = [K.MagnitudeTable.of(d) for d in deltas]
    kernel = K.compiled_kernel()
    for method in ("ties", "dare_ties"):
        spec = K.spec_for(method, 3, None)
        p = torch.tensor(K.slice_params(spec, GROUP, tables), dtype=torch.float32)
        keys = torch.tensor([tensor_key(1, "x", i) for i in range(3)])
        a, b = torch.empty(4096, dtype=torch.bfloat16), torch.empty(4096, dtype=torch.bfloat16)
        K._slice_kernel(spec, a, base, deltas, p, torch.tensor(7), keys)
        kernel(spec, b, base, deltas, p, torch.tensor(7), keys)
        assert torch.equal(a, b), method


def test_a_kernel_that_fails_to_compile_falls_back_to_eager(monkeypatch, capsys):
    def broken(*args, **kwargs):
        raise RuntimeError("no C++ compiler\nmore")

    monkeypatch.setattr(K, "compiled_kernel", lambda: broken)
    base, _, deltas = family_tensors(torch.float32, n=3000)
    sources = {"w": [base, *deltas]}
    inputs = MergeInputs(sources, {"w": ["device"] * 4}, torch.device("cpu"), 1 << 20)
    tables = {"w": [K.MagnitudeTable.of(d) for d in deltas]}
    group = {"w": GROUP}
    a, b = torch.empty(3000), torch.empty(3000)
    K.Merger(K.spec_for("ties", 3, None), "cpu", tables, compiled=True).run(inputs, {"w": a}, group)
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "compiling the merge kernel failed (RuntimeError: no C++ compiler)" in err
    K.Merger(K.spec_for("ties", 3, None), "cpu", tables).run(inputs, {"w": b}, group)
    assert torch.equal(a, b)


def test_inputs_of_mixed_dtypes_are_staged_exactly():
    base, _, deltas = family_tensors(torch.bfloat16, n=5000)
    half = [d.to(torch.float16) for d in deltas]
    sources = {"a": [base, *deltas], "b": [base.to(torch.float16), *half]}
    streamed = MergeInputs(sources, {n: ["host"] * 4 for n in sources}, torch.device("cpu"), 1 << 20)
    for u in streamed.units():
        assert all(torch.equal(v.float(), s[u.offset:u.offset + u.n].float()) for v, s in zip(u.views, sources[u.name]))
