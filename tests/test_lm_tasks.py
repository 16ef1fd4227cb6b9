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
    assert LMTasksFitness.spaces == ("hf_merge", "hf_mixture", "hf_layers")
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


# shared-prefix choice scoring and example subsets ---------------------------------------------------------

MC_ROWS = [  # choices of different token lengths, examples with 2 to 5 choices, prompts of different lengths
    ("up abc=", ["ABC", "ABD", "A"]),
    ("1+2=", ["3", "12", "21", "0", "333333"]),
    ("rev hello world=", ["dlrow olleh", "x"]),
    ("sort dcba=", ["abcd", "dcba", "bacd", "a"]),
    ("count a aab=", ["2", "1"]),
    ("copy xy=", ["xy", "yx", "xyxy"]),
    ("q=", ["x", "yy"]),
]


def mc_file(tmp_path, rows=MC_ROWS, name="mc.jsonl"):
    return write(tmp_path / name, [{"prompt": p, "choices": c, "answer": i % len(c), "split": "train"}
                                   for i, (p, c) in enumerate(rows)])


def loglik(f, model, tok, i=0):
    with torch.inference_mode():
        return f._choice_loglik(model, f._encoded(tok, i, "train"))


def test_shared_prefix_log_likelihoods_and_picks_equal_the_per_choice_path(lm, tmp_path):
    from evomerge.fitness.lm_tasks import shared_prefix_supported

    model, tok = lm
    tasks = [{"name": "mc", "path": mc_file(tmp_path), "kind": "choice"}]
    ref = LMTasksFitness(LMTasksFitnessConfig(name="lm_tasks", tasks=tasks, batch_size=1, choice_scoring="per_choice"))
    want, want_scores = loglik(ref, model, tok), ref.evaluate_model(model, tok)[1]
    assert [len(v) for v in want] == [len(c) for _, c in MC_ROWS]
    assert model.config._attn_implementation == "sdpa" and shared_prefix_supported(model, 64)
    rows_per_forward = []
    hook = model.register_forward_pre_hook(lambda m, a, kw: rows_per_forward.append(kw["input_ids"].shape[0]),
                                           with_kwargs=True)
    try:
        for impl in ("sdpa", "eager"):
            model.config._attn_implementation = impl
            for bs in (1, 3, 64):  # 3 does not divide the 7 examples
                f = LMTasksFitness(LMTasksFitnessConfig(name="lm_tasks", tasks=tasks, batch_size=bs))
                assert f.cfg.choice_scoring == "shared_prefix"
                rows_per_forward.clear()
                got = loglik(f, model, tok)
                # one row per example (its prompt and all its choices), at most batch_size rows a forward
                assert sum(rows_per_forward) == len(MC_ROWS) and max(rows_per_forward) <= bs
                for g, w in zip(got, want):
                    np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5)
                    assert np.argmax(g) == np.argmax(w)
                np.testing.assert_array_equal(f.evaluate_model(model, tok)[1], want_scores)
    finally:
        hook.remove()
        model.config._attn_implementation = "sdpa"


def test_shared_prefix_runs_the_lm_head_only_where_a_choice_token_is_predicted(lm, tmp_path):
    model, tok = lm
    f = LMTasksFitness(LMTasksFitnessConfig(name="lm_tasks", batch_size=64, tasks=[
        {"name": "mc", "path": mc_file(tmp_path), "kind": "choice"}]))
    seen = []
    hook = model.register_forward_hook(lambda m, a, kw, out: seen.append((kw["input_ids"].shape, out.logits.shape)),
                                       with_kwargs=True)
    try:
        loglik(f, model, tok)
    finally:
        hook.remove()
    (ids_shape, logits_shape), = seen
    enc = f._encoded(tok, 0, "train")
    longest_prompt = max(len(p) for p, _ in enc)
    # one row per example: the prompts end in one column, the choices follow one after the other
    assert ids_shape == (len(MC_ROWS), longest_prompt + max(sum(len(c) for c in conts) for _, conts in enc))
    # the columns kept (over all rows): the prompts' last (it predicts every choice's first token) and
    # each choice's tokens but its last; the prompts' other columns never reach the LM head
    kept = {longest_prompt - 1}
    for _, conts in enc:
        at = longest_prompt
        for c in conts:
            kept |= set(range(at, at + len(c) - 1))
            at += len(c)
    assert logits_shape[:2] == (len(MC_ROWS), len(kept))


def test_shared_prefix_falls_back_where_the_model_cannot_take_the_packed_row(lm, tmp_path):
    from types import SimpleNamespace

    from evomerge.fitness.lm_tasks import shared_prefix_supported

    model, tok = lm

    def fake(**cfg):
        def forward(input_ids=None, attention_mask=None, position_ids=None):
            raise AssertionError("not called")
        return SimpleNamespace(config=SimpleNamespace(**{"_attn_implementation": "sdpa", **cfg}), forward=forward)

    assert shared_prefix_supported(fake(), 100)
    assert not shared_prefix_supported(fake(_attn_implementation="flash_attention_2"), 100)
    assert not shared_prefix_supported(fake(_attn_implementation="flex_attention"), 100)
    assert not shared_prefix_supported(fake(layer_types=["full_attention", "linear_attention"]), 100)
    assert shared_prefix_supported(fake(sliding_window=100), 100)  # the window covers every sequence
    assert not shared_prefix_supported(fake(sliding_window=99), 100)
    assert shared_prefix_supported(fake(sliding_window=8, use_sliding_window=False), 100)
    assert shared_prefix_supported(fake(sliding_window=8, layer_types=["full_attention"]), 100)
    assert not shared_prefix_supported(fake(sliding_window=8, layer_types=["sliding_attention", "full_attention"]), 100)
    assert not shared_prefix_supported(SimpleNamespace(forward=lambda input_ids: None), 100)  # no config
    # a model without position_ids (the bigram table) is scored by the per-choice path: same picks
    table = torch.randn(len(tok), len(tok))
    tasks = [{"name": "mc", "path": mc_file(tmp_path), "kind": "choice"}]
    a, b = (LMTasksFitness(LMTasksFitnessConfig(name="lm_tasks", tasks=tasks, choice_scoring=m))
            for m in ("shared_prefix", "per_choice"))
    np.testing.assert_array_equal(a.evaluate_model(Bigram(table), tok)[1], b.evaluate_model(Bigram(table), tok)[1])
    model.config._attn_implementation = "flash_attention_2"  # the tiny Llama, configured for flash-attention
    try:
        assert not shared_prefix_supported(model, 10)
    finally:
        model.config._attn_implementation = "sdpa"


def subset_fitness(lm, tmp_path, **kw):
    model, tok = lm
    prompts = ["up abc=", "rev hello=", "12+7=", "copy xy=", "sort dcba="]
    outs = [greedy(model, tok, p, 3) for p in prompts]
    assert all(outs)
    gen = [{"prompt": p, "answer": o if i % 2 else o + "z", "split": "train"}  # odd examples right
           for i, (p, o) in enumerate(zip(prompts, outs))]
    tasks = [{"name": "g", "path": write(tmp_path / "g.jsonl", gen), "kind": "generate", "max_new_tokens": 3},
             {"name": "mc", "path": mc_file(tmp_path), "kind": "choice", "weight": 3.0, "limit": 6}]
    cfg = LMTasksFitnessConfig(name="lm_tasks", tasks=tasks, **kw)
    return cfg, LMTasksFitness(cfg)


@pytest.mark.parametrize("bs", [1, 4])
def test_a_subset_scores_only_its_examples_and_follows_the_formula(lm, tmp_path, bs):
    model, tok = lm
    cfg, f = subset_fitness(lm, tmp_path, batch_size=bs)
    assert LMTasksFitness.example_counts(cfg) == [5, 6]  # the choice task after its limit
    fit, full, metrics = f.evaluate_model(model, tok)
    assert full.shape == (11,) and set(metrics) == {"g_accuracy", "mc_accuracy"}
    np.testing.assert_array_equal(full[:5], [0, 1, 0, 1, 0])
    calls = []
    gen, choose = f._generate, f._choose
    f._generate = lambda m, t, prompts, answers, n: calls.append(("g", len(prompts))) or gen(m, t, prompts, answers, n)
    f._choose = lambda m, exs, answers: calls.append(("mc", len(exs))) or choose(m, exs, answers)
    w = {"g": 1.0, "mc": 3.0}
    for ex in ([0, 3, 5, 9, 10], [1, 2], [6, 7, 8], [4], list(range(11)), []):
        calls.clear()
        ex = np.array(ex, dtype=np.int64)
        sub_fit, sub, sub_metrics = f.evaluate_model(model, tok, examples=ex)
        assert sub.dtype == np.float32
        np.testing.assert_array_equal(sub, full[ex])
        by_task = {"g": sub[ex < 5], "mc": sub[ex >= 5]}
        want = {f"{t}_accuracy": float(v.mean()) for t, v in by_task.items() if len(v)}
        assert sub_metrics == pytest.approx(want) and set(sub_metrics) == set(want)
        assert calls == [(t, len(v)) for t, v in by_task.items() if len(v)]  # only the selected examples ran
        if want:
            assert sub_fit == pytest.approx(sum(w[t] * float(v.mean()) for t, v in by_task.items() if len(v))
                                            / sum(w[t] for t, v in by_task.items() if len(v)))
        else:
            assert np.isnan(sub_fit)
    assert f.evaluate_model(model, tok, examples=None)[0] == fit
    assert f.holdout_model(model, tok) == {}


@pytest.mark.parametrize("ex", [[3, 1], [0, 0], [-1, 2], [11], [2, 11]])
def test_out_of_range_or_unsorted_examples_raise(lm, tmp_path, ex):
    model, tok = lm
    _, f = subset_fitness(lm, tmp_path)
    with pytest.raises(ValueError, match="sorted unique indices in 0..10"):
        f.evaluate_model(model, tok, examples=np.array(ex))
