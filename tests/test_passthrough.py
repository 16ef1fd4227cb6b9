"""Passthrough layer stacking: the output's blocks are the chosen input blocks, renumbered."""
import pytest
import torch
from safetensors.torch import load_file

from evomerge.errors import UserError
from evomerge.passthrough import mergekit_passthrough, stack_layers

from hf_models import tiny_family


@pytest.fixture(scope="module")
def fam(tmp_path_factory):
    root = tmp_path_factory.mktemp("pt")
    base, experts = tiny_family(root, experts=("a",))
    return root, base, {"base": base, "a": experts["a"]}


def test_stacked_model_loads_and_holds_the_chosen_blocks(fam, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    root, base, models = fam
    slices = [{"model": "base", "layers": [0, 2]}, {"model": "a", "layers": [1, 3]}]
    assert stack_layers(base, models, slices, tmp_path / "out") == 4
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    AutoTokenizer.from_pretrained(tmp_path / "out")
    assert model.config.num_hidden_layers == 4
    a = load_file(str(models["a"] / "model.safetensors"))
    b = load_file(str(base / "model.safetensors"))
    got = dict(model.named_parameters())
    name = "model.layers.{}.mlp.up_proj.weight"
    torch.testing.assert_close(got[name.format(1)].detach(), b[name.format(1)])
    torch.testing.assert_close(got[name.format(2)].detach(), a[name.format(1)])  # a's block 1 is now block 2
    torch.testing.assert_close(got[name.format(3)].detach(), a[name.format(2)])
    torch.testing.assert_close(got["model.embed_tokens.weight"].detach(), b["model.embed_tokens.weight"])  # first
    torch.testing.assert_close(got["lm_head.weight"].detach(), a["lm_head.weight"])  # last slice's model
    with torch.no_grad():
        model(torch.tensor([[2, 5, 6]]))  # runs


def test_bad_slices_are_named(fam, tmp_path):
    root, base, models = fam
    with pytest.raises(UserError, match=r"slices\[0\].layers: \[2, 9\] is outside the 3 layers of a"):
        stack_layers(base, models, [{"model": "a", "layers": [2, 9]}], tmp_path / "o")
    with pytest.raises(UserError, match=r"slices\[0\].model: 'z'"):
        stack_layers(base, models, [{"model": "z", "layers": [0, 1]}], tmp_path / "o")


def test_mergekit_form(fam):
    root, base, models = fam
    cfg = mergekit_passthrough(models, [{"model": "a", "layers": [0, 2]}])
    assert cfg["merge_method"] == "passthrough" and cfg["slices"][0]["sources"][0]["layer_range"] == [0, 2]
