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


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("mergekit_parity")
    paths = merge_parity.build_models(root / "models", hidden=64, layers=2, intermediate=128, vocab=256)
    base = merge_parity.load_state(paths["base"])
    experts = [merge_parity.load_state(p) for p in paths["experts"]]
    deltas = [{k: e[k] - base[k] for k in base} for e in experts]
    return root, paths, base, experts, deltas


@pytest.mark.parametrize("method", METHODS)
def test_matches_mergekit(models, method):
    root, paths, base, experts, deltas = models
    out_dir = root / f"mk_{method}"
    merge_parity.run_mergekit(MERGEKIT, merge_parity.mergekit_config(method, paths), out_dir)
    theirs = merge_parity.load_state(out_dir)
    ours = merge_parity.evomerge_merge(method, base, experts, {k: torch.empty_like(v) for k, v in base.items()},
                                       deltas=deltas)
    assert set(theirs) == set(ours)
    worst = 0.0
    for name, t in theirs.items():
        assert t.shape == ours[name].shape and t.dtype == ours[name].dtype == torch.float32, name
        worst = max(worst, float((t - ours[name]).abs().max()))
    assert worst <= 1e-6, f"{method}: max abs diff {worst:.3e} vs mergekit"


def test_passthrough_matches_mergekit(tmp_path):
    import subprocess

    import yaml
    from safetensors.torch import load_file

    from evomerge.passthrough import mergekit_passthrough, stack_layers

    sys.path.insert(0, str(ROOT / "tests"))
    from hf_models import tiny_family

    base, experts = tiny_family(tmp_path, experts=("a",))
    models = {"base": base, "a": experts["a"]}
    slices = [{"model": "base", "layers": [0, 2]}, {"model": "a", "layers": [1, 3]}]
    stack_layers(base, models, slices, tmp_path / "ours")
    (tmp_path / "mk.yaml").write_text(yaml.safe_dump(mergekit_passthrough(models, slices)))
    subprocess.run([MERGEKIT, str(tmp_path / "mk.yaml"), str(tmp_path / "theirs"), "--no-copy-tokenizer",
                    "--no-cuda", "--quiet"], check=True, env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"},
                   capture_output=True)
    ours = load_file(str(tmp_path / "ours" / "model.safetensors"))
    theirs = {}
    for f in (tmp_path / "theirs").glob("*.safetensors"):
        theirs.update(load_file(str(f)))
    assert set(ours) == set(theirs)
    assert max((ours[k] - theirs[k]).abs().max().item() for k in ours) == 0.0


@pytest.mark.parametrize("method", ["ties", "task_arithmetic", "linear"])
def test_exported_recipe_yaml_reproduces_the_merge(tmp_path, method):
    """A per-group recipe exported as mergekit YAML gives the tensors evomerge materialized."""
    import numpy as np

    from evomerge.export import mergekit_config
    from evomerge.hf_space import HFMergeSpace, HFMergeSpaceConfig

    sys.path.insert(0, str(ROOT / "tests"))
    from hf_models import tiny_family

    base, experts = tiny_family(tmp_path)
    space = HFMergeSpace(HFMergeSpaceConfig(
        name="hf_merge", method=method, cache_dir=str(tmp_path / "tv"),
        models={"base": str(base), "experts": {k: str(v) for k, v in experts.items()}}), seed=0)
    recipe = space.decode(np.random.default_rng(3).uniform(space.lower, space.upper))
    model = space.open_runtime("cpu").materialize(recipe)
    assert_mergekit_reproduces(mergekit_config(space, recipe), model, tmp_path)


def test_exported_mixture_yaml_reproduces_the_mixture(tmp_path):
    """An hf_mixture recipe (one coefficient per tensor and seed) is mergekit's linear, unnormalized."""

    import numpy as np

    from evomerge.hf_mixture import HFMixtureSpace, HFMixtureSpaceConfig

    sys.path.insert(0, str(ROOT / "tests"))
    from hf_models import tiny_family

    base, experts = tiny_family(tmp_path)
    space = HFMixtureSpace(HFMixtureSpaceConfig(
        name="hf_mixture", include_base=True, cache_dir=str(tmp_path / "cache"),
        models={"base": str(base), "experts": {k: str(v) for k, v in experts.items()}}), seed=0)
    recipe = space.decode(np.random.default_rng(3).normal(0.3, 0.5, space.dim))
    model = space.open_runtime("cpu").materialize(recipe)
    assert_mergekit_reproduces(space.mergekit_config(recipe), model, tmp_path)


def assert_mergekit_reproduces(config: dict, model, tmp_path) -> None:
    """`mergekit-yaml config` gives the tensors of our materialized `model` within 1e-6."""
    import subprocess

    import yaml
    from safetensors.torch import load_file

    (tmp_path / "mk.yaml").write_text(yaml.safe_dump(config))
    subprocess.run([MERGEKIT, str(tmp_path / "mk.yaml"), str(tmp_path / "theirs"), "--no-copy-tokenizer",
                    "--no-cuda", "--quiet"], check=True, env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"},
                   capture_output=True)
    theirs = {}
    for f in (tmp_path / "theirs").glob("*.safetensors"):
        theirs.update(load_file(str(f)))
    ours = dict(model.named_parameters())
    assert set(theirs) <= set(ours)
    diff = max((ours[k].detach() - theirs[k]).abs().max().item() for k in theirs)
    assert diff <= 1e-6
