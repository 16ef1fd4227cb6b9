"""Model pool: layer grouping, memory-mapped (sharded) checkpoints, compatibility and finiteness checks."""
import json

import pytest
import torch
from safetensors.torch import save_file

from evomerge.errors import UserError
from evomerge.weights import Checkpoint, check_compatible, check_finite, group_of, layer_index


@pytest.mark.parametrize("name, idx", [
    ("model.layers.12.self_attn.q_proj.weight", 12), ("transformer.h.3.mlp.c_fc.weight", 3),
    ("blocks.0.attn.weight", 0), ("model.embed_tokens.weight", None), ("lm_head.weight", None),
])
def test_layer_index(name, idx):
    assert layer_index(name) == idx


def test_groups_by_block_with_filters():
    assert group_of("model.layers.5.self_attn.q_proj.weight") == "layers.5"
    assert group_of("model.layers.5.self_attn.q_proj.weight", layers_per_group=4) == "layers.4-7"
    assert group_of("model.layers.5.self_attn.q_proj.weight", filters=["attn", "mlp"]) == "layers.5/attn"
    assert group_of("model.layers.5.mlp.up_proj.weight", filters=["attn", "mlp"]) == "layers.5/mlp"
    assert group_of("model.layers.5.input_layernorm.weight", filters=["attn", "mlp"]) == "layers.5"
    assert group_of("model.embed_tokens.weight") == "embed"
    assert group_of("lm_head.weight") == "head"
    assert group_of("model.norm.weight") == "norm"


def model(tmp_path, name, tensors, shards=1):
    d = tmp_path / name
    d.mkdir()
    names = list(tensors)
    if shards == 1:
        save_file(tensors, str(d / "model.safetensors"))
        return d
    weight_map = {}
    for i in range(shards):
        part = {n: tensors[n] for n in names[i::shards]}
        fname = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        save_file(part, str(d / fname))
        weight_map.update({n: fname for n in part})
    (d / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return d


TENSORS = {"model.layers.0.mlp.weight": torch.ones(4, 3), "model.layers.1.mlp.weight": torch.zeros(4, 3),
           "model.norm.weight": torch.ones(3)}


def test_single_and_sharded_checkpoints_read_the_same(tmp_path):
    a = Checkpoint.open(model(tmp_path, "a", TENSORS))
    b = Checkpoint.open(model(tmp_path, "b", TENSORS, shards=2))
    assert sorted(a.names()) == sorted(b.names()) == sorted(TENSORS)
    for n in TENSORS:
        assert torch.equal(a.tensor(n), b.tensor(n))
    assert b.slices()["model.layers.0.mlp.weight"] == ((4, 3), "F32")


def test_mismatched_expert_is_named_with_both_shapes(tmp_path):
    base = Checkpoint.open(model(tmp_path, "base", TENSORS))
    bad = dict(TENSORS, **{"model.layers.1.mlp.weight": torch.zeros(4, 5)})
    expert = Checkpoint.open(model(tmp_path, "exp", bad))
    with pytest.raises(UserError, match=r"expert math tensor model.layers.1.mlp.weight has shape \[4, 5\], "
                                        r"the base has \[4, 3\]"):
        check_compatible(base, {"math": expert})
    missing = Checkpoint.open(model(tmp_path, "miss", {k: v for k, v in TENSORS.items() if "norm" not in k}))
    with pytest.raises(UserError, match="expert m lacks tensor model.norm.weight"):
        check_compatible(base, {"m": missing})


def test_float_and_integer_tensors_do_not_mix(tmp_path):
    base = Checkpoint.open(model(tmp_path, "base", TENSORS))
    half = Checkpoint.open(model(tmp_path, "half", {k: v.half() for k, v in TENSORS.items()}))
    check_compatible(base, {"half": half})  # float16 casts to the base's float32
    ints = Checkpoint.open(model(tmp_path, "ints",
                                 dict(TENSORS, **{"model.norm.weight": torch.ones(3, dtype=torch.int32)})))
    with pytest.raises(UserError, match="expert i tensor model.norm.weight has dtype I32, the base has F32"):
        check_compatible(base, {"i": ints})


def test_nan_is_named(tmp_path):
    bad = dict(TENSORS, **{"model.norm.weight": torch.tensor([1.0, float("nan"), 0.0])})
    with pytest.raises(UserError, match="models: e tensor model.norm.weight contains NaN or Inf"):
        check_finite("e", Checkpoint.open(model(tmp_path, "e", bad)))


def test_missing_files_are_named(tmp_path):
    with pytest.raises(UserError, match="no model.safetensors"):
        Checkpoint.open(tmp_path)
