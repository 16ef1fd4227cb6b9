"""LoRA experts (PEFT adapter directories) in the pool: seen as the base plus scale * B @ A, as PEFT merges them."""
import numpy as np
import pytest
import torch

from evomerge.errors import UserError
from evomerge.spaces.hf_merge import HFMergeSpace, HFMergeSpaceConfig

from hf_models import tiny_family


@pytest.fixture(scope="module")
def lora_family(tmp_path_factory):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("lora")
    base, experts = tiny_family(root, experts=("full",))
    torch.manual_seed(1)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base),
                           LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
                                      use_rslora=False))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    model.save_pretrained(root / "lora")
    merged = {k: v.detach().clone() for k, v in model.merge_and_unload().state_dict().items()}
    return root, base, {"full": experts["full"], "lora": root / "lora"}, merged


def test_adapter_tensors_equal_peft_merge_and_unload(lora_family):
    from evomerge.weights import Adapter, Checkpoint

    root, base, experts, merged = lora_family
    ad = Adapter(experts["lora"], Checkpoint.open(base))
    assert len(ad.lora) == 3 * 3  # q, v, down in each of the 3 layers
    for name in ad.names():
        torch.testing.assert_close(ad.tensor(name), merged[name], rtol=0, atol=1e-6)


def test_a_lora_expert_merges_like_a_full_one(lora_family):
    root, base, experts, merged = lora_family
    space = HFMergeSpace(HFMergeSpaceConfig(
        name="hf_merge", method="task_arithmetic", layer_granularity=0, cache_dir=str(root / "tv"),
        models={"base": str(base), "experts": {k: str(v) for k, v in experts.items()}}), seed=0)
    model = space.open_runtime("cpu").materialize(space.decode(np.array([0.0, 1.0])))  # the LoRA expert alone
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.detach(), merged[name], rtol=0, atol=1e-6)


def test_unsupported_adapters_are_one_line_errors(lora_family, tmp_path):
    import json
    import shutil

    from evomerge.weights import Adapter, Checkpoint

    root, base, experts, _ = lora_family
    bad = tmp_path / "dora"
    shutil.copytree(experts["lora"], bad)
    cfg = json.loads((bad / "adapter_config.json").read_text())
    (bad / "adapter_config.json").write_text(json.dumps({**cfg, "use_dora": True}))
    with pytest.raises(UserError, match="only plain LoRA adapters"):
        Adapter(bad, Checkpoint.open(base))
