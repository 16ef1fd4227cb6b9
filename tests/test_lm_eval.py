"""lm_eval fitness: lm-evaluation-harness tasks over local JSONL on a tiny model; per-example scores
as lm-eval's per-sample values (and as lm_tasks' on the same examples), no stale results after an
in-place change of the weights, errors before the search, a short search through the real command."""
import json
import os
import subprocess
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import numpy as np
import pytest
import torch
import yaml

from evomerge.errors import UserError
from evomerge.demos.tasks import write_lm_eval_tasks
from evomerge.demos.training import build_tokenizer
from evomerge.fitness import FITNESSES
from evomerge.fitness.lm_eval import LMEvalFitness, LMEvalFitnessConfig
from evomerge.fitness.lm_tasks import LMTasksFitness, LMTasksFitnessConfig
from hf_models import tiny_family

pytest.importorskip("lm_eval")


def write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def add_rows(n_train=12, n_test=6, op="+"):
    """Choice and generate examples over digits, in the lm_tasks format (both tokenizers know them)."""
    rows, mc = [], []
    for i in range(n_train + n_test):
        a, b = (i * 7) % 10, (i * 3) % 10
        ans = str(a + b) if op == "+" else str(abs(a - b))
        split = "train" if i < n_train else "test"
        rows.append({"prompt": f"{a}{op}{b}=", "answer": ans, "split": split})
        choices = [ans, str(int(ans) + 1), str(int(ans) + 11)]
        k = i % 3
        choices[0], choices[k] = choices[k], choices[0]
        mc.append({"prompt": f"{a}{op}{b}=", "choices": choices, "answer": k, "split": split})
    return rows, mc


@pytest.fixture(scope="module")
def tasks(tmp_path_factory):
    """JSONL files (lm_tasks format) and their lm-eval task YAMLs, as `run.py zoo tinylm` writes them."""
    root = tmp_path_factory.mktemp("lmeval")
    gen, mc = add_rows()
    files = {"add": write(root / "add.jsonl", gen), "add_mc": write(root / "add_mc.jsonl", mc)}
    written = write_lm_eval_tasks(root / "lm_eval_tasks", files)
    assert set(written) == {"tinylm_add", "tinylm_add_mc"}
    return root, files


def llama(seed: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = build_tokenizer([])
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    return LlamaForCausalLM(cfg).eval(), tok


def lm_eval_cfg(root, **kw):
    return LMEvalFitnessConfig(name="lm_eval", **{
        "include_path": str(root / "lm_eval_tasks"), "batch_size": 8,
        "tasks": [{"name": "tinylm_add_mc", "metric": "acc"},
                  {"name": "tinylm_add", "metric": "exact_match", "weight": 3.0}], **kw})


def lm_tasks_fitness(files):
    return LMTasksFitness(LMTasksFitnessConfig(name="lm_tasks", batch_size=8, tasks=[
        {"name": "add_mc", "path": files["add_mc"], "kind": "choice"},
        {"name": "add", "path": files["add"], "kind": "generate", "max_new_tokens": 8, "weight": 3.0}]))


def test_registered_lazily_with_fields_described():
    assert FITNESSES["lm_eval"] == (LMEvalFitnessConfig, LMEvalFitness)
    assert LMEvalFitness.spaces == ("hf_merge", "hf_mixture")
    task_cls = LMEvalFitnessConfig.model_fields["tasks"].annotation.__args__[0]
    for cls in (LMEvalFitnessConfig, task_cls):
        for name, f in cls.model_fields.items():
            assert name == "name" and cls is LMEvalFitnessConfig or f.description, (cls.__name__, name)
    code = "import sys, fitness; assert 'lm_eval' not in sys.modules, 'fitness imported lm_eval'"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       cwd=os.path.dirname(os.path.dirname(__file__)))
    assert r.returncode == 0, r.stderr


def test_scores_are_lm_evals_per_sample_values_and_follow_in_place_changes(tasks):
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    root, files = tasks
    model, tok = llama(0)
    fit = LMEvalFitness(lm_eval_cfg(root))
    ref = lm_tasks_fitness(files)
    assert LMEvalFitness.objectives(fit.cfg) == ["tinylm_add_mc/acc", "tinylm_add/exact_match"]

    f, scores, metrics = fit.evaluate_model(model, tok)
    assert scores.dtype == np.float32 and scores.shape == (24,)  # 12 + 12 train examples, tasks in config order
    assert set(metrics) == {"tinylm_add_mc/acc", "tinylm_add/exact_match"}
    assert f == pytest.approx((metrics["tinylm_add_mc/acc"] + 3 * metrics["tinylm_add/exact_match"]) / 4)
    assert metrics["tinylm_add_mc/acc"] == pytest.approx(scores[:12].mean())

    # lm-eval itself, from scratch: the same per-sample acc, in doc order
    tm = TaskManager(include_path=str(root / "lm_eval_tasks"), include_defaults=False)
    res = simple_evaluate(HFLM(pretrained=model, tokenizer=tok, batch_size=4), tasks=["tinylm_add_mc"],
                          task_manager=tm, bootstrap_iters=0, log_samples=True)
    samples = sorted(res["samples"]["tinylm_add_mc"], key=lambda s: s["doc_id"])
    assert len(samples) == 6  # lm-eval's default split is the test split ...
    fit_test = fit.holdout_model(model, tok)  # ... which the fitness holds out
    assert fit_test["tinylm_add_mc/acc@test"] == pytest.approx(res["results"]["tinylm_add_mc"]["acc,none"])
    res = simple_evaluate(HFLM(pretrained=model, tokenizer=tok, batch_size=4),
                          tasks=[{"task": "tinylm_add_mc", **yaml.safe_load(
                              (root / "lm_eval_tasks" / "tinylm_add_mc.yaml").read_text()), "test_split": None}],
                          task_manager=tm, bootstrap_iters=0, log_samples=True)
    samples = sorted(res["samples"]["tinylm_add_mc"], key=lambda s: s["doc_id"])
    np.testing.assert_array_equal(scores[:12], [s["acc"] for s in samples])  # the validation split

    # and lm_tasks on the same examples agrees example by example, held-out split included
    rf, rscores, _ = ref.evaluate_model(model, tok)
    np.testing.assert_array_equal(scores, rscores)
    assert f == pytest.approx(rf)
    held = ref.holdout_model(model, tok)
    assert fit_test == pytest.approx({"tinylm_add_mc/acc@test": held["add_mc_test_accuracy"],
                                      "tinylm_add/exact_match@test": held["add_test_accuracy"],
                                      "fitness@holdout": (held["add_mc_test_accuracy"]
                                                          + 3 * held["add_test_accuracy"]) / 4})

    # the worker merges in place: other weights, the same model object and HFLM -> fresh scores
    wrapper = fit._lm
    other, _ = llama(1)
    with torch.no_grad():
        for p, q in zip(model.parameters(), other.parameters()):
            p.copy_(q)
    f2, scores2, _ = fit.evaluate_model(model, tok)
    assert fit._lm is wrapper
    assert not np.array_equal(scores2, scores)
    np.testing.assert_array_equal(scores2, ref.evaluate_model(model, tok)[1])

    # limits: the first N examples of the search split (fractions of it), per task or for all
    fit = LMEvalFitness(lm_eval_cfg(root, limit=0.5, holdout=False))
    _, s, m = fit.evaluate_model(model, tok)
    np.testing.assert_array_equal(s, np.concatenate([scores2[:6], scores2[12:18]]))
    assert fit.holdout_model(model, tok) == {}
    cfg = lm_eval_cfg(root).model_copy(update={"tasks": [lm_eval_cfg(root).tasks[0].model_copy(update={"limit": 5})]})
    np.testing.assert_array_equal(LMEvalFitness(cfg).evaluate_model(model, tok)[1], scores2[:5])


def test_checks_before_the_search(tasks, monkeypatch):
    root, _ = tasks

    def err(**kw):
        with pytest.raises(UserError) as e:
            LMEvalFitness.check(lm_eval_cfg(root, **kw))
        return str(e.value)

    t = [{"name": "tinylm_add_mc"}]
    assert err(tasks=[{"name": "tinylm_add_mc", "metric": "f1"}]) == \
        "fitness.tasks[0].metric: task 'tinylm_add_mc' produces ['acc', 'acc_norm'], not 'f1'"
    assert err(tasks=[*t, {"name": "tinylm_add", "metric": "acc"}]) == \
        "fitness.tasks[1].metric: task 'tinylm_add' produces ['exact_match'], not 'acc'"
    assert err(tasks=[{"name": "tinylm_add_mc", "split": "train"}]) == \
        "fitness.tasks[0].split: task 'tinylm_add_mc' has splits ['validation', 'test'], not 'train'"
    assert err(tasks=[{"name": "tinylm_add_mc", "holdout_split": "validation"}]).startswith(
        "fitness.tasks[0].holdout_split: 'validation' is the split searched on")
    assert err(tasks=t, include_path=str(root / "nope")) == f"fitness.include_path: {root / 'nope'}: no such directory"
    LMEvalFitness.check(lm_eval_cfg(root, tasks=[{"name": "tinylm_add_mc", "split": "test", "num_fewshot": 2}]))

    monkeypatch.setitem(sys.modules, "lm_eval", None)  # not installed
    assert "pip install 'evomerge[lm-eval]'" in err(tasks=t)


def test_config_rejects_bad_values(tasks):
    from pydantic import ValidationError

    t = {"name": "x"}
    for bad in ({"tasks": []}, {"tasks": [t, t]}, {"tasks": [dict(t, weight=0)]}, {"tasks": [dict(t, limit=0)]},
                {"tasks": [t], "limit": -1}, {"tasks": [t], "batch_size": 0}, {"tasks": [dict(t, extra=1)]},
                {"tasks": [dict(t, num_fewshot=-1)]}):
        with pytest.raises(ValidationError):
            LMEvalFitnessConfig(name="lm_eval", **bad)


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    """A tiny random family (tests/hf_models) and two choice tasks its tokenizer can read."""
    root = tmp_path_factory.mktemp("lmeval_e2e")
    base, experts = tiny_family(root)
    files = {}
    for name, op in (("add_mc", "+"), ("sub_mc", "-")):
        files[name] = write(root / f"{name}.jsonl", add_rows(8, 4, op)[1])
    write_lm_eval_tasks(root / "lm_eval_tasks", files)
    cfg = {
        "seed": 1,
        "space": {"name": "hf_merge", "method": "ties", "layer_granularity": 0, "cache_dir": str(root / "tv"),
                  "models": {"base": str(base), "experts": {k: str(v) for k, v in experts.items()}}},
        "strategy": {"name": "cmaes", "diagonal": True, "popsize": 4, "sigma0": 0.2, "x0": "center"},
        "fitness": {"name": "lm_eval", "include_path": str(root / "lm_eval_tasks"), "batch_size": 16,
                    "tasks": [{"name": "tinylm_add_mc"}, {"name": "tinylm_sub_mc", "metric": "acc_norm"}]},
        "engine": {"workers": 1, "batch_size": 2},
        "budget": {"max_evals": 6},
    }
    return root, cfg


@pytest.mark.parametrize("task, field, value, message", [
    (1, "name", "tinylm_sbu_mc", "error: fitness.tasks[1].name: no lm-eval task 'tinylm_sbu_mc' in {inc} or "
                                 "lm-eval's own tasks (did you mean tinylm_sub_mc"),
    (0, "metric", "bleu", "error: fitness.tasks[0].metric: task 'tinylm_add_mc' produces ['acc', 'acc_norm'], "
                          "not 'bleu'"),
])
def test_cli_refuses_before_anything_starts(cli, family, tmp_path, task, field, value, message):
    root, cfg = family
    cfg = json.loads(json.dumps(cfg))
    cfg["fitness"]["tasks"][task][field] = value
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    r = cli("--config", str(tmp_path / "c.yaml"), "--out", str(tmp_path / "run"))
    assert r.returncode == 2 and not (tmp_path / "run").exists()
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(message.format(inc=root / "lm_eval_tasks")), r.stderr


def test_search_through_the_real_command(cli, family, tmp_path):
    root, cfg = family
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    out = tmp_path / "run"
    r = cli("--config", str(tmp_path / "c.yaml"), "--out", str(out), "--no-progress")
    assert r.returncode == 0, r.stderr
    evals = [json.loads(line) for line in (out / "evals.jsonl").read_text().splitlines()]
    assert len(evals) == 6 and not any(e.get("failed") for e in evals)
    assert all(set(e["metrics"]) >= {"tinylm_add_mc/acc", "tinylm_sub_mc/acc_norm"} for e in evals)
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["best"]["holdout"]) == {"tinylm_add_mc/acc@test", "tinylm_sub_mc/acc_norm@test",
                                               "fitness@holdout"}
    assert summary["pareto_front"]["objectives"] == ["tinylm_add_mc/acc", "tinylm_sub_mc/acc_norm"]
    assert (out / "best" / "recipe.json").is_file()
    assert "lm_eval" not in r.stderr and "Running loglikelihood" not in r.stderr  # workers are quiet
