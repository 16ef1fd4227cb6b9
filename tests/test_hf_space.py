"""The hf_merge space: vector -> recipe, in-place materialization, exports, dry-run."""
import json

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file

from evomerge.errors import UserError
from evomerge.spaces.hf_merge import HFMergeSpace, HFMergeSpaceConfig
from evomerge.merge import merge_tensor

from hf_models import tiny_family


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    root = tmp_path_factory.mktemp("fam")
    return root, *tiny_family(root)


def space(family, **kw):
    root, base, experts = family
    cfg = dict(name="hf_merge", models={"base": str(base), "experts": {k: str(v) for k, v in experts.items()}},
               cache_dir=str(root / "tv"), **kw)
    return HFMergeSpace(HFMergeSpaceConfig(**cfg), seed=0)


def test_layout_per_layer_group_and_recipe(family):
    s = space(family, method="ties")
    assert s.groups == ["embed", "layers.0", "layers.1", "layers.2", "norm", "head"]
    assert s.dim == 6 * 2 * 3  # groups x (weight, density) x experts
    r = s.decode((s.lower + s.upper) / 2)
    assert r["method"] == "ties" and r["experts"] == ["a", "b", "c"]
    assert r["groups"]["layers.1"] == {"weight": [0.5] * 3, "density": [0.55] * 3}
    json.dumps(r)  # JSON-serialisable
    # out-of-range vectors are clipped into the ranges
    assert s.decode(np.full(s.dim, 9.0))["groups"]["embed"]["density"] == [1.0] * 3


def test_granularity_filters_and_fixed_params(family):
    s = space(family, method="ties", layer_granularity=2, filters=["attn", "mlp"], params={"density": 0.7})
    assert "layers.0-1/attn" in s.groups and "layers.2-3/mlp" in s.groups
    assert s.dim == len(s.groups) * 3  # only the weights are searched
    assert s.decode(s.seeds()[0])["groups"]["layers.0-1/mlp"]["density"] == [0.7] * 3
    g = space(family, method="task_arithmetic", layer_granularity=0, params={"weight": {"low": -1, "high": 1}})
    assert g.groups == ["all"] and g.dim == 3 and g.lower.min() == -1


def test_bad_space_configs(family):
    with pytest.raises(ValueError, match="method linear takes weight"):
        space(family, method="linear", params={"density": 0.5})
    with pytest.raises(ValueError, match="density: must lie in"):
        space(family, method="ties", params={"density": {"low": 0, "high": 2}})
    with pytest.raises(UserError, match="nothing to search"):
        space(family, method="linear", params={"weight": 0.5})


def test_materialize_in_place_equals_the_operator_on_the_checkpoints(family):
    root, base_dir, experts = family
    s = space(family, method="ties", normalize=True)
    rt = s.open_runtime("cpu")
    ptrs = {n: t.data_ptr() for n, t in rt.targets.items()}
    rng = np.random.default_rng(0)
    x = rng.uniform(s.lower, s.upper)
    recipe = s.decode(x)
    model = rt.materialize(recipe)
    assert all(t.data_ptr() == ptrs[n] for n, t in rt.targets.items())  # no new tensors
    base = load_file(str(base_dir / "model.safetensors"))
    ex = [load_file(str(p / "model.safetensors")) for p in experts.values()]
    name = "model.layers.1.mlp.up_proj.weight"
    g = recipe["groups"]["layers.1"]
    want = merge_tensor("ties", name, base[name], [e[name] for e in ex], torch.empty_like(base[name]),
                        weights=g["weight"], density=g["density"], normalize=True)
    torch.testing.assert_close(dict(model.named_parameters())[name].detach(), want, rtol=0, atol=1e-6)
    # task vectors were written once and are reused
    assert len(list((root / "tv").glob("*/?.safetensors"))) == 3
    assert len(list((root / "tv").glob("*/?.magnitudes.safetensors"))) == 3  # ties: one magnitude table per expert


def test_slerp_needs_one_expert(family):
    root, base, experts = family
    with pytest.raises(ValueError, match="exactly one expert"):
        space(family, method="slerp")
    cfg = HFMergeSpaceConfig(name="hf_merge", method="slerp", cache_dir=str(root / "tv"),
                             models={"base": str(base), "experts": {"a": str(experts["a"])}})
    s = HFMergeSpace(cfg, 0)
    assert s.dim == len(s.groups) and s.decode(s.seeds()[0])["groups"]["embed"] == {"t": [0.5]}


def test_mergekit_yaml_names_every_tensor(family):
    s = space(family, method="ties", normalize=False)
    x = np.random.default_rng(1).uniform(s.lower, s.upper)
    cfg = s.mergekit_config(s.decode(x))
    assert cfg["merge_method"] == "ties" and cfg["parameters"] == {"normalize": False}
    assert [m["model"] for m in cfg["models"]] == [str(p) for p in family[2].values()]
    w = cfg["models"][0]["parameters"]["weight"]
    assert {e["filter"] for e in w} == set(s.tensor_group)
    yaml.safe_dump(cfg)


@pytest.mark.parametrize("method,normalize", [("task_arithmetic", False), ("task_arithmetic", True),
                                              ("linear", True), ("linear", False)])
def test_weight_gradient_matches_finite_differences(family, tmp_path, method, normalize):
    from evomerge.fitness.lm_tasks import LMTasksFitness, LMTasksFitnessConfig

    rows = [{"prompt": f"{a}+{b}=", "answer": str(a + b), "split": "train"} for a, b in [(1, 2), (3, 4), (2, 2)]]
    rows += [{"prompt": "ab", "choices": ["c", "d"], "answer": 1, "split": "train"}]
    (tmp_path / "g.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:3]))
    (tmp_path / "c.jsonl").write_text(json.dumps(rows[3]) + "\n")
    fit = LMTasksFitness(LMTasksFitnessConfig(name="lm_tasks", tasks=[
        {"name": "g", "path": str(tmp_path / "g.jsonl"), "kind": "generate"},
        {"name": "c", "path": str(tmp_path / "c.jsonl"), "kind": "choice", "weight": 2.0}]))
    s = space(family, method=method, normalize=normalize, layer_granularity=2,
              params={"weight": {"low": -1.0, "high": 2.0}})
    s.check_weight_gradient()
    rt = s.open_runtime("cpu")
    rt.model.double()  # finite differences in float64
    rt.targets = {n: p for n, p in rt.model.named_parameters() if n in rt.targets}
    x = np.random.default_rng(1).uniform(0.2, 0.9, s.dim)
    recipe = s.decode(x)

    def loss(rec):
        with torch.no_grad():
            return float(fit.loss_model(rt.materialize(rec), rt.tokenizer))

    value, grads = rt.weight_gradient(recipe, lambda m: fit.loss_model(m, rt.tokenizer))
    assert value == pytest.approx(loss(recipe), rel=1e-9)
    assert not any(p.requires_grad and p.grad is not None for p in rt.model.parameters())
    eps = 1e-3
    for g in ("embed", "layers.0-1", "head"):
        for k in range(3):
            up, down = json.loads(json.dumps(recipe)), json.loads(json.dumps(recipe))
            up["groups"][g]["weight"][k] += eps
            down["groups"][g]["weight"][k] -= eps
            numeric = (loss(up) - loss(down)) / (2 * eps)
            assert grads[g][k] == pytest.approx(numeric, rel=1e-3, abs=1e-6), (g, k)


def test_weight_gradient_is_refused_for_nonlinear_merges(family):
    with pytest.raises(UserError, match="space.method: ties: gradients"):
        space(family, method="ties").check_weight_gradient()
