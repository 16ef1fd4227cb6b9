"""LM tasks fitness: JSONL loading and its errors, batched greedy exact match, log-likelihood choice."""
import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest
import torch

from evomerge.errors import UserError
from evomerge.demos.training import build_tokenizer
from evomerge.fitness import FITNESSES
from evomerge.fitness.lm_tasks import LMTasksFitness, LMTasksFitnessConfig


def write(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return str(path)


@pytest.fixture(scope="module")
def lm():
    """A randomly initialised tiny Llama with the character tokenizer (no training needed)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = build_tokenizer([])
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id)
    model = LlamaForCausalLM(cfg).eval()
    return model, tok


def greedy(model, tok, prompt, n):
    """Unbatched, uncached reference decoding: argmax of a full forward pass, n times."""
    ids = tok(prompt)["input_ids"]
    new = []
    with torch.no_grad():
        for _ in range(n):
            nxt = int(model(torch.tensor([ids + new])).logits[0, -1].argmax())
            if nxt == tok.eos_token_id:
                break
            new.append(nxt)
    return tok.decode(new, skip_special_tokens=True).split("\n")[0].strip()


class Bigram(torch.nn.Module):
    """logits[t] = table[token t]: sequence log-likelihoods can be worked out by hand."""

    def __init__(self, table):
        super().__init__()
        self.table = torch.nn.Parameter(table)

    @property
    def device(self):
        return self.table.device

    def forward(self, input_ids, attention_mask=None, use_cache=False):
        return type("Out", (), {"logits": self.table[input_ids]})()


def test_registered_with_fields_described():
    assert FITNESSES["lm_tasks"] == (LMTasksFitnessConfig, LMTasksFitness)
    assert LMTasksFitness.spaces == ("hf_merge", "hf_mixture")
    for cls in (LMTasksFitnessConfig, LMTasksFitnessConfig.model_fields["tasks"].annotation.__args__[0]):
        for name, f in cls.model_fields.items():
            assert name == "name" or f.description, (cls.__name__, name)


def test_generate_scores_metrics_and_weighted_fitness(lm, tmp_path):
    model, tok = lm
    prompts = ["up abc=", "rev hello=", "12+7=", "copy xy=", "sort dcba=", "count a aab="]
    outs = [greedy(model, tok, p, 4) for p in prompts]
    assert all(outs)  # a random model writes something: every answer below is right or wrong by choice
    # task a: examples 0, 2, 4 right; task b: example 1 right, 3 and 5 wrong; test split: 1 of 2
    a = [{"prompt": p, "answer": o if i % 2 == 0 else o + "z", "split": "train"}
         for i, (p, o) in enumerate(zip(prompts, outs))]
    b = [{"prompt": p, "answer": o if i == 1 else "~", "split": "train"} for i, (p, o) in enumerate(zip(prompts, outs))]
    b += [{"prompt": prompts[0], "answer": outs[0], "split": "test"},
          {"prompt": prompts[1], "answer": "nope", "split": "test"}]
    tasks = [{"name": "a", "path": write(tmp_path / "a.jsonl", a), "kind": "generate", "max_new_tokens": 4},
             {"name": "b", "path": write(tmp_path / "b.jsonl", b), "kind": "generate", "max_new_tokens": 4,
              "weight": 3.0}]
    for bs in (1, 4, 32):  # left padding and batching change nothing
        f = LMTasksFitness(LMTasksFitnessConfig(name="lm_tasks", tasks=tasks, batch_size=bs))
        fit, scores, metrics = f.evaluate_model(model, tok)
        assert scores.dtype == np.float32 and scores.shape == (12,)
        np.testing.assert_array_equal(scores, [1, 0, 1, 0, 1, 0] + [0, 1, 0, 0, 0, 0])
        assert metrics == {"a_accuracy": 0.5, "b_accuracy": pytest.approx(1 / 6)}
        assert fit == pytest.approx((0.5 + 3 * (1 / 6)) / 4)
        assert f.holdout_model(model, tok) == {"b_test_accuracy": 0.5}

    limited = [dict(tasks[0], limit=2)]
    f = LMTasksFitness(LMTasksFitnessConfig(name="lm_tasks", tasks=limited))
    fit, scores, metrics = f.evaluate_model(model, tok)
    np.testing.assert_array_equal(scores, [1, 0])
    assert f.holdout_model(model, tok) == {}  # no test examples, no test metric


def test_choice_picks_the_highest_summed_log_likelihood(tmp_path):
    tok = build_tokenizer([])
    v = tok.get_vocab()
    table = torch.full((len(tok), len(tok)), -30.0)
    # after '=': 'x' has logit 2, 'y' 1 (others ~ -inf); after 'x': 'x' 0 and 'y' 0; after 'y': 'y' 5
    table[v["="], v["x"]], table[v["="], v["y"]] = 2.0, 1.0
    table[v["x"], v["x"]], table[v["x"], v["y"]] = 0.0, 0.0
    table[v["y"], v["y"]] = 5.0
    model = Bigram(table)
    lx, ly = np.log(np.exp(2) / (np.exp(2) + np.exp(1))), np.log(np.exp(1) / (np.exp(2) + np.exp(1)))
    # by hand: "x" = lx = -0.31; "xx" = lx + log .5 = -1.01; "yy" = ly + log 1 = -1.31 = "yyyyyy"
    rows = [{"prompt": "q=", "choices": ["xx", "x", "yy"], "answer": 1, "split": "train"},
            {"prompt": "q=", "choices": ["yy", "xx"], "answer": 1, "split": "train"},
            # the sum decides, not the mean (-0.22 per token for "yyyyyy", -0.31 for "x")
            {"prompt": "q=", "choices": ["yyyyyy", "x"], "answer": 1, "split": "train"},
            {"prompt": "q=", "choices": ["xx", "yy"], "answer": 1, "split": "train"},  # wrong label
            {"prompt": "q=", "choices": ["xy", "x"], "answer": 0, "split": "test"}]
    assert lx > lx + np.log(0.5) > ly and ly / 6 > lx
    cfg = LMTasksFitnessConfig(name="lm_tasks", tasks=[
        {"name": "mc", "path": write(tmp_path / "mc.jsonl", rows), "kind": "choice"}], batch_size=2)
    f = LMTasksFitness(cfg)
    fit, scores, metrics = f.evaluate_model(model, tok)
    np.testing.assert_array_equal(scores, [1, 1, 1, 0])
    assert fit == metrics["mc_accuracy"] == 0.75
    assert f.holdout_model(model, tok) == {"mc_test_accuracy": 0.0}  # "x" beats "xy" by log 2


def test_choice_batching_matches_one_pair_at_a_time(lm, tmp_path):
    model, tok = lm
    rows = [{"prompt": p, "choices": c, "answer": 0, "split": "train"}
            for p, c in [("up abc=", ["ABC", "ABD", "A"]), ("1+2=", ["3", "12", "21"]),
                         ("rev hello world=", ["dlrow olleh", "x"])]]
    path = write(tmp_path / "mc.jsonl", rows)
    ll = []
    with torch.no_grad():
        for r in rows:
            ctx = tok(r["prompt"])["input_ids"]
            lls = []
            for c in r["choices"]:
                cont = tok(c, add_special_tokens=False)["input_ids"]
                logp = torch.log_softmax(model(torch.tensor([ctx + cont])).logits[0], -1)
                lls.append(sum(float(logp[len(ctx) - 1 + k, t]) for k, t in enumerate(cont)))
            ll.append(int(np.argmax(lls)) == 0)
    for bs in (1, 3, 64):
        f = LMTasksFitness(LMTasksFitnessConfig(name="lm_tasks", batch_size=bs,
                                                tasks=[{"name": "mc", "path": path, "kind": "choice"}]))
        np.testing.assert_array_equal(f.evaluate_model(model, tok)[1], ll)


@pytest.mark.parametrize("line, msg", [
    ("{not json", "line 2: invalid JSON"),
    ('{"prompt": "a", "split": "train"}', "line 2: missing 'answer'"),
    ('{"prompt": "a", "answer": "b", "split": "dev"}', "line 2: 'split' must be 'train' or 'test'"),
    ('[1, 2]', "line 2: expected a JSON object"),
])
def test_malformed_line_is_a_user_error_naming_file_and_line(tmp_path, line, msg):
    good = json.dumps({"prompt": "a", "answer": "b", "split": "train"})
    path = write(tmp_path / "bad.jsonl", [good, line])
    cfg = LMTasksFitnessConfig(name="lm_tasks", tasks=[{"name": "t", "path": path, "kind": "generate"}])
    with pytest.raises(UserError) as e:
        LMTasksFitness(cfg)
    assert str(e.value).startswith(f"fitness.tasks[0].path: {path} ") and msg in str(e.value)


def test_choice_lines_are_checked(tmp_path):
    rows = ['{"prompt": "a", "choices": ["x", "y"], "answer": 2, "split": "train"}']
    path = write(tmp_path / "mc.jsonl", rows)
    cfg = LMTasksFitnessConfig(name="lm_tasks", tasks=[{"name": "t", "path": path, "kind": "choice"}])
    with pytest.raises(UserError, match=r"mc.jsonl line 1: 'answer' must be the index"):
        LMTasksFitness(cfg)


def test_missing_file_and_empty_train_split(tmp_path):
    ok = write(tmp_path / "ok.jsonl", [{"prompt": "a", "answer": "b", "split": "train"}])
    missing = str(tmp_path / "nope.jsonl")
    cfg = LMTasksFitnessConfig(name="lm_tasks", tasks=[{"name": "t", "path": ok, "kind": "generate"},
                                                       {"name": "u", "path": missing, "kind": "generate"}])
    with pytest.raises(UserError) as e:
        LMTasksFitness(cfg)
    assert str(e.value) == f"fitness.tasks[1].path: {missing}: no such JSONL file"
    only_test = write(tmp_path / "t.jsonl", [{"prompt": "a", "answer": "b", "split": "test"}])
    with pytest.raises(UserError, match="no examples with"):
        LMTasksFitness(LMTasksFitnessConfig(name="lm_tasks", tasks=[
            {"name": "t", "path": only_test, "kind": "generate"}]))


def test_config_rejects_bad_values():
    from pydantic import ValidationError

    t = {"name": "t", "path": "x.jsonl", "kind": "generate"}
    for bad in ({"tasks": []}, {"tasks": [dict(t, weight=0)]}, {"tasks": [dict(t, kind="rank")]},
                {"tasks": [t, t]}, {"tasks": [dict(t, limit=0)]}, {"tasks": [t], "batch_size": 0},
                {"tasks": [dict(t, extra=1)]}):
        with pytest.raises(ValidationError):
            LMTasksFitnessConfig(name="lm_tasks", **bad)


@pytest.mark.parametrize("data, msg", [
    (b"", ": empty file (expected one JSON object a line)"),
    (b"\n \n", ": empty file"),
    (b'\xef\xbb\xbf{"prompt": "a", "answer": "b", "split": "train"}\n', ": starts with a UTF-8 byte-order mark"),
    (b'{"prompt": "a", "answer": "b", "split": "train"}\n{"prompt": "caf\xe9", "answer": "b", "split": "train"}\n',
     ": line 2: not UTF-8 text (byte 0xe9)"),
    (b'{"prompt": "a", "answer": "b", "split": "train"}\n{"prompt": " ", "answer": "b", "split": "train"}\n',
     " line 2: 'prompt' is empty"),
    (b'{"prompt": "", "answer": "b", "split": "train"}\n', " line 1: 'prompt' is empty"),
    (b'{"prompt": "a", "answer": true, "split": "train"}\n', " line 1: 'answer' must be a string or a number"),
])
def test_encoding_empty_files_and_prompts_are_refused_by_the_drivers_check(tmp_path, data, msg):
    path = tmp_path / "t.jsonl"
    path.write_bytes(data)
    cfg = LMTasksFitnessConfig(name="lm_tasks", tasks=[{"name": "t", "path": str(path), "kind": "generate"}])
    with pytest.raises(UserError) as e:
        LMTasksFitness.check(cfg)  # what the CLI calls before Ray starts
    assert str(e.value).startswith(f"fitness.tasks[0].path: {path}{msg}")
    with pytest.raises(UserError):
        LMTasksFitness(cfg)


@pytest.mark.parametrize("row, msg", [
    ({"prompt": "a", "choices": ["x", "y"], "answer": True}, "'answer' must be the index of the right choice, 0..1 "
                                                             "(got True)"),
    ({"prompt": "a", "choices": ["x", "y"], "answer": -1}, "(got -1)"),
    ({"prompt": "a", "choices": ["x", ""], "answer": 0}, "'choices' must be a list of at least 2 non-empty strings"),
    ({"prompt": "a", "answer": 0}, "missing 'choices'"),
])
def test_choice_defects(tmp_path, row, msg):
    path = write(tmp_path / "mc.jsonl", [dict(row, split="train")])
    cfg = LMTasksFitnessConfig(name="lm_tasks", tasks=[{"name": "t", "path": path, "kind": "choice"}])
    with pytest.raises(UserError) as e:
        LMTasksFitness.check(cfg)
    assert str(e.value).startswith(f"fitness.tasks[0].path: {path} line 1: ") and msg in str(e.value)


def test_check_accepts_good_files_and_the_api_fitness_reads_them_before_the_server(tmp_path, monkeypatch):
    from evomerge.fitness import api

    good = write(tmp_path / "ok.jsonl", [{"prompt": "a", "answer": "b", "split": "train"}])
    LMTasksFitness.check(LMTasksFitnessConfig(name="lm_tasks", tasks=[{"name": "t", "path": good, "kind": "generate"}]))
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(b"\xef\xbb\xbf" + (tmp_path / "ok.jsonl").read_bytes())
    reached = []
    monkeypatch.setattr(api, "_check_reachable", lambda cfg: reached.append(cfg))
    cfg = api.APIFitnessConfig(name="api", base_url="http://127.0.0.1:9/v1", tasks=[
        {"name": "t", "path": good, "kind": "generate"}, {"name": "u", "path": str(bad), "kind": "generate"}])
    with pytest.raises(UserError, match=r"^fitness.tasks\[1\].path: .*bad.jsonl: starts with a UTF-8 byte-order"):
        api.APIFitness.check(cfg)
    assert not reached
    api.APIFitness.check(cfg.model_copy(update={"tasks": cfg.tasks[:1]}))
    assert len(reached) == 1
