"""The per-tensor task-vector methods (della, della_linear, sce, ram, ramplus_tl) against mergekit 0.1.5's own
functions, in process, on small random float32 tensors."""
import numpy as np
import pytest
import torch
from mergekit.merge_methods import registry
from mergekit.merge_methods.base import TensorGroup

from evomerge import dare, ops_taskvec
from evomerge.merge import merge_tensor
from evomerge.methods import METHODS
from evomerge.spaces.hf_merge import HFMergeSpace, HFMergeSpaceConfig

from hf_models import tiny_family

SHAPES = [(48, 40), (300,), (6, 5, 4)]


@pytest.fixture(params=[False, True], ids=["whole", "chunked"])
def chunks(request, monkeypatch):
    """Run each test once whole and once with tiny chunks (every pass split, packed masks across chunks)."""
    if request.param:
        monkeypatch.setattr(ops_taskvec, "CHUNK", 64)
    return request.param


def family(shape, k, seed=0, zero_share=0.3):
    """A base and k experts; a share of every task vector's entries exactly zero (RAM's counts vary)."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=g)
    experts = []
    for _ in range(k):
        d = torch.randn(shape, generator=g) * 0.1
        d[torch.rand(shape, generator=g) < zero_share] = 0
        experts.append(base + d)
    return base, experts


def mk(name, base, experts, **params):
    group = TensorGroup.from_tensors([base, *experts], base_index=0)
    return registry.get(name).merge_group(group, **params)


def ours(name, base, experts, seed=0, options=None, normalize=None, **group):
    out = torch.empty_like(base)
    return merge_tensor(name, "t", base, experts, out, params=group, seed=seed, options=options,
                        normalize=normalize)


def test_uniform_is_dares_draw():
    for key, off, n in ((12345, 0, 1000), (dare.M31, 77, 513)):
        assert torch.equal(ops_taskvec.uniform(key, off, n, "cpu"), dare.uniform(key, off, n, "cpu"))


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("k", [2, 4])
def test_sce_equals_mergekit(shape, k, chunks):
    base, experts = family(shape, k)
    for topk in (1.0, 0.6, 0.1, 0.0):
        want = mk("sce", base, experts, select_topk=topk)
        torch.testing.assert_close(ours("sce", base, experts, select_topk=[topk]), want, rtol=0, atol=1e-6)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("k", [2, 3, 4])
def test_ram_and_ramplus_tl_equal_mergekit(shape, k, chunks):
    base, experts = family(shape, k)
    for eps in (1e-5, 0.05):
        want = mk("ram", base, experts, epsilon=eps)
        torch.testing.assert_close(ours("ram", base, experts, options={"epsilon": eps}), want, rtol=0, atol=1e-6)
        for r, alpha in ((0.1, 0.2), (0.5, 5.0), (0.0, 0.0)):
            want = mk("ramplus_tl", base, experts, r=r, alpha=alpha, epsilon=eps)
            got = ours("ramplus_tl", base, experts, options={"epsilon": eps}, r=[r], alpha=[alpha])
            torch.testing.assert_close(got, want, rtol=0, atol=1e-6)


def della_params(name, k, weights, density, epsilon, rescale=True, normalize=None):
    ids = range(1, k + 1)
    return dict(int8_mask=False, rescale=rescale, normalize=METHODS[name].normalize if normalize is None else normalize,
                weight=dict(zip(ids, weights)), density=dict(zip(ids, density)), epsilon=dict(zip(ids, epsilon)),
                **{"lambda": 1.0})


@pytest.mark.parametrize("name", ["della", "della_linear"])
@pytest.mark.parametrize("shape", SHAPES)
def test_della_at_density_one_equals_mergekit(name, shape, chunks):
    base, experts = family(shape, 3)
    w = [0.7, -0.4, 1.3]
    want = mk(name, base, experts, **della_params(name, 3, w, [1.0] * 3, [0.0] * 3))
    got = ours(name, base, experts, weight=w, density=[1.0] * 3, epsilon=[0.0] * 3)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)


@pytest.mark.parametrize("name", ["della", "della_linear"])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("rescale", [True, False])
def test_della_equals_mergekit_given_our_masks(name, shape, rescale, chunks, monkeypatch):
    """mergekit's della with its torch.bernoulli draws replaced by ours (u < mergekit's own keep probabilities):
    the ranks, rescale, sign election and divisor are mergekit's to 1e-6."""
    base, experts = family(shape, 3, zero_share=0.0)  # no tied magnitudes: the ranks are unique
    w, dens, eps = [0.7, -0.4, 1.3], [0.5, 0.3, 1.0], [0.2, 0.1, 0.05]
    seed, drawn = 11, []
    masked = [i for i, d in enumerate(dens) if d < 1]

    def bernoulli(probs):
        i = masked[len(drawn)]
        drawn.append(i)
        u = dare.uniform(dare.tensor_key(seed, "t", i), 0, probs.numel(), probs.device).view(probs.shape)
        return (u < probs).to(probs.dtype)

    monkeypatch.setattr(torch, "bernoulli", bernoulli)
    want = mk(name, base, experts, **della_params(name, 3, w, dens, eps, rescale=rescale))
    assert drawn == masked
    got = ours(name, base, experts, seed=seed, options={"rescale": rescale}, weight=w, density=dens, epsilon=eps)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)


@pytest.mark.parametrize("shape", [(200, 500), (100_000,)])
def test_della_keep_share_by_magnitude_rank(shape):
    """The kept share of each rank decile (within rows; 1-D: the whole vector) is the mean keep probability
    (density - epsilon) + rank_norm * 2 * epsilon over the decile."""
    base, (expert,) = family(shape, 1, zero_share=0.0)
    d = expert - base
    density, epsilon = 0.5, 0.2
    got = ours("della_linear", base, [expert], options={"rescale": False}, weight=[1.0], density=[density],
               epsilon=[epsilon]) - base
    kept = (got != 0).reshape(-1 if len(shape) == 1 else shape[0], shape[-1]).float()
    rows = d.reshape(kept.shape).abs()
    rank = rows.argsort(dim=1).argsort(dim=1).float() / (rows.shape[1] - 1)
    for lo in np.linspace(0, 0.9, 10):
        band = (rank >= lo) & (rank < lo + 0.1)
        share = float(kept[band].mean())
        expected = float(((density - epsilon) + rank[band] * 2 * epsilon).mean())
        assert abs(share - expected) < 0.02, (lo, share, expected)
    torch.testing.assert_close(got[got != 0], d[got != 0], rtol=0, atol=1e-6)  # kept entries whole


@pytest.mark.parametrize("shape", SHAPES)
def test_della_rescale_keeps_the_l1_norm(shape, chunks):
    base, (expert,) = family(shape, 1, zero_share=0.0)
    got = ours("della_linear", base, [expert], weight=[1.0], density=[0.3], epsilon=[0.1]) - base
    assert (got == 0).any()
    torch.testing.assert_close(got.abs().sum(), (expert - base).abs().sum(), rtol=1e-5, atol=0)


@pytest.mark.parametrize("name", ["della", "della_linear"])
def test_della_masks_follow_the_seed(name):
    base, experts = family((64, 32), 2)
    kw = dict(weight=[0.5, 0.8], density=[0.4, 0.6], epsilon=[0.1, 0.1])
    a, b, c = (ours(name, base, experts, seed=s, **kw) for s in (1, 1, 2))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert torch.isfinite(a).all()


def test_della_clamps_epsilon_as_decode_does():
    base, experts = family((32, 16), 2)
    kw = dict(weight=[0.5, 0.8], density=[0.5, 0.9])
    got = ours("della", base, experts, epsilon=[0.6, 0.3], **kw)  # density -/+ epsilon leaves (0, 1)
    torch.testing.assert_close(got, ours("della", base, experts, epsilon=[0.4995, 0.0999], **kw), rtol=0, atol=0)
    with pytest.raises(ValueError, match="t: della needs finite"):
        ours("della", base, experts, epsilon=[float("nan"), 0.1], **kw)


# through the product -----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("fam")
    return root, *tiny_family(root)


@pytest.mark.parametrize("method", ["della", "della_linear", "sce", "ramplus_tl"])  # ram: no space (nothing searched)
def test_space_materializes_the_methods_tensors(tiny, method):
    from safetensors.torch import load_file

    root, base_dir, experts = tiny
    cfg = HFMergeSpaceConfig(name="hf_merge", method=method, cache_dir=str(root / "tv"),
                             models={"base": str(base_dir), "experts": {k: str(v) for k, v in experts.items()}})
    s = HFMergeSpace(cfg, seed=3)
    rt = s.open_runtime("cpu")
    recipe = s.decode(np.random.default_rng(0).uniform(s.lower, s.upper))
    params = dict(rt.materialize(recipe).named_parameters())
    base = load_file(str(base_dir / "model.safetensors"))
    ex = [load_file(str(p / "model.safetensors")) for p in experts.values()]
    assert all(torch.isfinite(p).all() for p in params.values())
    for name in ("model.layers.1.mlp.up_proj.weight", "model.norm.weight", "model.embed_tokens.weight"):
        g = recipe["groups"][s.tensor_group[name]]
        want = merge_tensor(method, name, base[name], [e[name] for e in ex], torch.empty_like(base[name]),
                            params=g, seed=recipe["seed"], options=recipe.get("options"))
        torch.testing.assert_close(params[name].detach(), want, rtol=0, atol=0)


@pytest.mark.parametrize("name", ["della", "della_linear", "sce", "ram", "ramplus_tl"])
def test_inputs_untouched_and_bfloat16_is_computed_in_float32(name, chunks):
    base, experts = family((40, 24), 3)
    base, experts = base.bfloat16(), [e.bfloat16() for e in experts]
    before = [t.clone() for t in (base, *experts)]
    group = {"della": dict(weight=[0.5, 0.8, 0.3], density=[0.4, 0.6, 1.0], epsilon=[0.1, 0.2, 0.0]),
             "sce": dict(select_topk=[0.5]), "ramplus_tl": dict(r=[0.3], alpha=[0.5])}
    group = group.get("della" if name.startswith("della") else name, {})
    got = ours(name, base, experts, seed=5, **group)
    assert got.dtype == torch.bfloat16 and all(torch.equal(a, b) for a, b in zip(before, (base, *experts)))
    want = ours(name, base.float(), [e.float() for e in experts], seed=5, **group)
    assert torch.equal(got, want.bfloat16())


# the compiled chunk arithmetic ---------------------------------------------------------------------------------

def test_compiled_passes_equal_the_eager_passes(monkeypatch):
    """della, della_linear and sce compiled (one fused pass per chunk) give the eager passes' tensors, to the bit,
    whole and in chunks (masks unmasked / dropped experts, rescale on and off, every top-k regime)."""
    pytest.importorskip("torch._inductor")
    della = [dict(weight=[0.7, -0.4, 1.3], density=[0.5, 0.3, 1.0], epsilon=[0.2, 0.1, 0.05]),
             dict(weight=[0.7, 0.4, 0.3], density=[0.5, 0.0, 0.8], epsilon=[0.2, 0.1, 0.05])]
    cases = [("della", {"rescale": True}, della), ("della_linear", {"rescale": False}, della),
             ("sce", {}, [dict(select_topk=[t]) for t in (1.0, 0.6, 0.1, 0.0)])]
    for chunk in (ops_taskvec.CHUNK, 64):
        monkeypatch.setattr(ops_taskvec, "CHUNK", chunk)
        for shape in ((48, 40), (300,)):
            base, experts = family(shape, 3)
            for name, options, groups in cases:
                impl = ops_taskvec.TASKVEC[name](options, 3)
                stats = impl.prepare("t", base, experts)
                for group in groups:
                    a, b = torch.empty_like(base), torch.empty_like(base)
                    impl.compiled = False
                    impl.merge("t", base, experts, group, stats, 7, a)
                    impl.compiled = True
                    impl.merge("t", base, experts, group, stats, 7, b)
                    assert torch.equal(a, b), (chunk, shape, name, group)
    assert not ops_taskvec._FAILED


def test_a_pass_that_fails_to_compile_falls_back_to_eager(monkeypatch, capsys):
    def broken(fn):
        def run(*args, **kwargs):
            raise RuntimeError("no C++ compiler\nmore")
        return run

    monkeypatch.setattr(ops_taskvec, "compiled", broken)
    monkeypatch.setattr(ops_taskvec, "_FAILED", [])
    base, experts = family((32, 16), 2)
    group = dict(weight=[0.5, 0.8], density=[0.4, 0.6], epsilon=[0.1, 0.1])
    impl = ops_taskvec.Della({"rescale": True}, 2)
    impl.compiled = True
    stats = impl.prepare("t", base, experts)
    a, b = torch.empty_like(base), torch.empty_like(base)
    impl.merge("t", base, experts, group, stats, 3, a)
    impl.merge("t", base, experts, group, stats, 3, a)  # said once
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "compiling the merge's chunk arithmetic failed (RuntimeError: no C++" in err
    impl.compiled = False
    impl.merge("t", base, experts, group, stats, 3, b)
    assert torch.equal(a, b)
