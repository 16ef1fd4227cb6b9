"""The self-made tiny causal-LM family: offline loading, task files, experts that know their skill."""
import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch

from evomerge.errors import UserError
from evomerge.demos.tinylm import build_family, zoo_main
from evomerge.demos.training import build_tokenizer
from evomerge.fitness.lm_tasks import LMTasksFitness, LMTasksFitnessConfig, accuracy_scorer

SKILLS = ["upper", "copy"]


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    return build_family(tmp_path_factory.mktemp("zoo") / "tiny", seed=0, size="tiny", skills=SKILLS,
                        scorer=accuracy_scorer)


def test_layout_and_offline_loading(family):
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    assert set(family["experts"]) == set(SKILLS)
    dirs = [family["base"], *family["experts"].values()]
    for d in dirs:
        assert os.path.isfile(os.path.join(d, "model.safetensors"))
        tok = AutoTokenizer.from_pretrained(d)
        model = AutoModelForCausalLM.from_pretrained(d)
        assert isinstance(model, LlamaForCausalLM) and model.config.vocab_size == len(tok)
        assert tok.pad_token_id is not None and tok.eos_token_id is not None
        assert tok("up ab=")["input_ids"][0] == tok.bos_token_id
    names = {n for n, _ in AutoModelForCausalLM.from_pretrained(dirs[0]).named_parameters()}
    assert names == {n for n, _ in AutoModelForCausalLM.from_pretrained(dirs[1]).named_parameters()}
    saved = json.loads(open(os.path.join(family["out"], "family.json")).read())
    assert saved["accuracy"] == family["accuracy"]


def test_task_files_parse_with_both_splits(family):
    assert set(family["tasks"]) == {*SKILLS, *(f"{s}_mc" for s in SKILLS)}
    for name, path in family["tasks"].items():
        rows = [json.loads(line) for line in open(path)]
        assert {r["split"] for r in rows} == {"train", "test"}
        assert len({r["prompt"] for r in rows}) == len(rows)  # no prompt twice
        for r in rows:
            if name.endswith("_mc"):
                assert r["choices"][r["answer"]] and len(set(r["choices"])) == len(r["choices"])
            else:
                assert isinstance(r["answer"], str) and r["answer"]
    up = [json.loads(line) for line in open(family["tasks"]["upper"])]
    assert all(r["answer"] == r["prompt"][3:-1].upper() for r in up)


def test_each_expert_beats_the_base_on_its_own_skill(family):
    acc = family["accuracy"]
    for s in SKILLS:
        assert acc[s][s]["train"] > acc["base"][s]["train"]
        assert acc[s][f"{s}_mc"]["train"] > acc["base"][f"{s}_mc"]["train"]
    assert acc["base"]["upper"]["train"] == 0  # the base knows the format, not the skill
    # the recorded accuracies are what the fitness measures on the saved models
    from transformers import AutoModelForCausalLM, AutoTokenizer

    d = family["experts"]["upper"]
    f = LMTasksFitness(LMTasksFitnessConfig(name="lm_tasks", tasks=[
        {"name": "upper", "path": family["tasks"]["upper"], "kind": "generate"}]))
    fit, scores, metrics = f.evaluate_model(AutoModelForCausalLM.from_pretrained(d), AutoTokenizer.from_pretrained(d))
    assert metrics["upper_accuracy"] == acc["upper"]["upper"]["train"] == fit


def test_tokenizer_round_trip_is_exact_and_deterministic(family):
    from transformers import AutoTokenizer

    saved = AutoTokenizer.from_pretrained(family["base"])
    fresh = build_tokenizer([])
    for text in ["up abc=ABC", "count a aab=2", "12+7=19", "sort dcba=abcd", "x y,z:-"]:
        ids = saved(text)["input_ids"]
        assert ids == fresh(text)["input_ids"]
        assert len(ids) == len(text) + 1  # one token per character after <s>
        assert saved.decode(ids, skip_special_tokens=True) == text
    assert saved.get_vocab() == fresh.get_vocab()


def test_same_seed_same_family(family, tmp_path):
    again = build_family(tmp_path / "again", seed=0, size="tiny", skills=["upper"])
    for task in ("upper", "upper_mc"):
        assert open(family["tasks"][task]).read() == open(again["tasks"][task]).read()
    from safetensors.torch import load_file

    for a, b in [(family["base"], again["base"]), (family["experts"]["upper"], again["experts"]["upper"])]:
        x = load_file(os.path.join(a, "model.safetensors"))
        y = load_file(os.path.join(b, "model.safetensors"))
        assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


def test_bad_arguments_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="--skills nope: unknown skill"):
        build_family(tmp_path / "a", size="tiny", skills=["nope"])
    with pytest.raises(UserError, match="--size huge"):
        build_family(tmp_path / "a", size="huge")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("")
    with pytest.raises(UserError, match="not empty"):
        zoo_main(["tinylm", "--out", str(tmp_path / "full"), "--size", "tiny"])
