"""evomerge's merge operators reproduce mergekit's `mergekit-yaml` output on a tiny Llama.

Skipped unless a mergekit-yaml executable is found: $EVOMERGE_MERGEKIT_YAML, else
`mergekit-yaml` on PATH, else /work/mkvenv/bin/mergekit-yaml (mergekit is not a dependency:
install it in its own venv, see bench/merge_parity.py).
"""
import importlib.util
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))  # the bench script imports its sibling bench/common.py
_spec = importlib.util.spec_from_file_location("merge_parity", ROOT / "bench" / "merge_parity.py")
merge_parity = importlib.util.module_from_spec(_spec)
sys.modules.setdefault("merge_parity", merge_parity)
_spec.loader.exec_module(merge_parity)

MERGEKIT = merge_parity.find_mergekit()
pytestmark = pytest.mark.skipif(MERGEKIT is None, reason="no mergekit-yaml executable found")

METHODS = ["linear", "task_arithmetic", "ties", "ties_unnormalized", "slerp"]
EXPORTED = ["ties", "task_arithmetic", "linear"]


@pytest.fixture(scope="module")
def cases(tmp_path_factory):
    """Every case's tensors, ours and mergekit's: what evomerge computes, then one mergekit run for all.

    {case: (ours, theirs)}: the five methods on random Llama checkpoints (merge_tensor), a passthrough
    layer stack, three per-group recipes exported as mergekit YAML and an hf_mixture recipe (the models
    evomerge materializes)."""
    import numpy as np
    from safetensors.torch import load_file

    from evomerge.spaces.hf_mixture import HFMixtureSpace, HFMixtureSpaceConfig
    from evomerge.spaces.hf_merge import HFMergeSpace, HFMergeSpaceConfig
    from evomerge.passthrough import mergekit_passthrough, stack_layers

    sys.path.insert(0, str(ROOT / "tests"))
    from hf_models import tiny_family

    root = tmp_path_factory.mktemp("mergekit_parity")
    ours, jobs = {}, []

    paths = merge_parity.build_models(root / "models", hidden=64, layers=2, intermediate=128, vocab=256)
    base = merge_parity.load_state(paths["base"])
    experts = [merge_parity.load_state(p) for p in paths["experts"]]
    deltas = [{k: e[k] - base[k] for k in base} for e in experts]
    for method in METHODS:
        ours[method] = merge_parity.evomerge_merge(method, base, experts,
                                                   {k: torch.empty_like(v) for k, v in base.items()}, deltas=deltas)
        jobs.append((f"{method}", merge_parity.mergekit_config(method, paths)))

    one_base, one = tiny_family(root / "one", experts=("a",))
    models = {"base": one_base, "a": one["a"]}
    slices = [{"model": "base", "layers": [0, 2]}, {"model": "a", "layers": [1, 3]}]
    stack_layers(one_base, models, slices, root / "passthrough_ours")
    ours["passthrough"] = load_file(str(root / "passthrough_ours" / "model.safetensors"))
    jobs.append(("passthrough", mergekit_passthrough(models, slices)))

    fam_base, fam = tiny_family(root / "family")
    spec = {"base": str(fam_base), "experts": {k: str(v) for k, v in fam.items()}}
    for method in EXPORTED:
        space = HFMergeSpace(HFMergeSpaceConfig(name="hf_merge", method=method, cache_dir=str(root / f"tv_{method}"),
                                                models=spec), seed=0)
        recipe = space.decode(np.random.default_rng(3).uniform(space.lower, space.upper))
        ours[f"exported_{method}"] = params(space.open_runtime("cpu").materialize(recipe))
        jobs.append((f"exported_{method}", space.mergekit_config(recipe)))
    space = HFMixtureSpace(HFMixtureSpaceConfig(name="hf_mixture", include_base=True, cache_dir=str(root / "mix"),
                                                models=spec), seed=0)
    recipe = space.decode(np.random.default_rng(3).normal(0.3, 0.5, space.dim))
    ours["mixture"] = params(space.open_runtime("cpu").materialize(recipe))
    jobs.append(("mixture", space.mergekit_config(recipe)))

    merge_parity.run_mergekit_many(MERGEKIT, [(config, root / f"mk_{case}") for case, config in jobs])
    return {case: (ours[case], merge_parity.load_state(root / f"mk_{case}")) for case, _ in jobs}


def params(model) -> dict:
    return {k: v.detach().clone() for k, v in model.named_parameters()}


@pytest.mark.parametrize("method", METHODS)
def test_matches_mergekit(cases, method):
    ours, theirs = cases[method]
    assert set(theirs) == set(ours)
    worst = 0.0
    for name, t in theirs.items():
        assert t.shape == ours[name].shape and t.dtype == ours[name].dtype == torch.float32, name
        worst = max(worst, float((t - ours[name]).abs().max()))
    assert worst <= 1e-6, f"{method}: max abs diff {worst:.3e} vs mergekit"


def test_passthrough_matches_mergekit(cases):
    """A layer stack (frankenmerge) equals mergekit's passthrough, bit for bit."""
    ours, theirs = cases["passthrough"]
    assert set(ours) == set(theirs)
    assert max((ours[k] - theirs[k]).abs().max().item() for k in ours) == 0.0


@pytest.mark.parametrize("method", EXPORTED)
def test_exported_recipe_yaml_reproduces_the_merge(cases, method):
    """A per-group recipe exported as mergekit YAML gives the tensors evomerge materialized."""
    assert_mergekit_reproduces(*cases[f"exported_{method}"])


def test_exported_mixture_yaml_reproduces_the_mixture(cases):
    """An hf_mixture recipe (one coefficient per tensor and seed) is mergekit's linear, unnormalized."""
    assert_mergekit_reproduces(*cases["mixture"])


def assert_mergekit_reproduces(ours: dict, theirs: dict) -> None:
    """mergekit's tensors are those of our materialized model within 1e-6."""
    assert set(theirs) <= set(ours)
    diff = max((ours[k] - theirs[k]).abs().max().item() for k in theirs)
    assert diff <= 1e-6
