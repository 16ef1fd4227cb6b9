"""hf_merge end to end through the real command: dry-run, a search on two Ray workers, exports."""
import json

import pytest
import torch
import yaml

from hf_models import tiny_family


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("hfe2e")
    base, experts = tiny_family(root)
    rows = [{"prompt": f"{a}+{b}=", "answer": str(a + b), "split": "train" if i < 12 else "test"}
            for i, (a, b) in enumerate((i % 5, i % 3) for i in range(16))]
    (root / "add.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = {
        "seed": 1,
        "space": {"name": "hf_merge", "method": "ties", "layer_granularity": 2, "cache_dir": str(root / "tv"),
                  "models": {"base": str(base), "experts": {k: str(v) for k, v in experts.items()}}},
        "strategy": {"name": "cmaes", "diagonal": True, "popsize": 4, "sigma0": 0.2, "x0": "center"},
        "fitness": {"name": "lm_tasks", "tasks": [{"name": "add", "path": str(root / "add.jsonl"),
                                                   "kind": "generate", "max_new_tokens": 3},
                                                  {"name": "add4", "path": str(root / "add.jsonl"),
                                                   "kind": "generate", "max_new_tokens": 3, "limit": 4}]},
        "engine": {"workers": 2, "batch_size": 2},
        "budget": {"max_evals": 8},
    }
    (root / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    return root


def test_dry_run_prints_a_compact_plan_and_all_of_it_with_verbose(cli, setup):
    r = cli("--config", str(setup / "cfg.yaml"), "--dry-run")
    assert r.returncode == 0, r.stderr
    assert "dimension: 30" in r.stdout  # (embed, layers.0-1, layers.2-3, norm, head) x 2 params x 3 experts
    assert "layout (30 rows):" in r.stdout and "strategy: cmaes, fitness: lm_tasks" in r.stdout
    assert "memory plan (the CPU, per worker; 2 workers per node):" in r.stdout and "nothing streams" in r.stdout
    assert len(r.stdout.splitlines()) < 40
    r = cli("--config", str(setup / "cfg.yaml"), "--dry-run", "--verbose")
    assert r.returncode == 0, r.stderr
    assert "layers.2-3/density/c [0.1, 1]" in r.stdout
    centre = json.loads(r.stdout.split("recipe at the centre:\n", 1)[1].split("\nstrategy: ")[0])
    assert centre["groups"]["embed"]["weight"] == [0.5, 0.5, 0.5]


def test_search_logs_recipes_and_exports_them(cli, setup, tmp_path):
    out = tmp_path / "run"
    r = cli("--config", str(setup / "cfg.yaml"), "--out", str(out), "--no-progress")
    assert r.returncode == 0, r.stderr
    evals = [json.loads(line) for line in (out / "evals.jsonl").read_text().splitlines()]
    assert len(evals) == 8 and all(e["recipe"]["method"] == "ties" for e in evals)
    assert {e["worker"] for e in evals} == {0, 1}
    summary = json.loads((out / "summary.json").read_text())
    assert "add_test_accuracy" in summary["best"]["holdout"]
    best = json.loads((out / "best" / "recipe.json").read_text())
    assert best == next(e["recipe"] for e in evals if e["id"] == summary["best"]["eval_id"])

    # export evaluation 3 as a model directory: from_pretrained loads it, equal to the best/ of that recipe
    from transformers import AutoModelForCausalLM, AutoTokenizer

    r = cli("export", str(out), "--eval-id", "3", "--to", str(tmp_path / "m3"), "--mergekit", str(tmp_path / "m3.yaml"))
    assert r.returncode == 0, r.stderr
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "m3")
    AutoTokenizer.from_pretrained(tmp_path / "m3")
    third = evals[[e["id"] for e in evals].index(3)]
    assert json.loads((tmp_path / "m3" / "recipe.json").read_text()) == third["recipe"]
    mk = yaml.safe_load((tmp_path / "m3.yaml").read_text())
    assert mk["merge_method"] == "ties" and len(mk["models"]) == 3
    assert isinstance(next(model.parameters()), torch.Tensor)

    r = cli("export", str(out), "--eval-id", "999", "--to", str(tmp_path / "x"))
    assert r.returncode == 2 and "--eval-id 999: no such evaluation" in r.stderr

    # two tasks: the summary reports the Pareto front, and export can pick from it by preference
    front = summary["pareto_front"]
    assert front["objectives"] == ["add_accuracy", "add4_accuracy"] and front["members"]
    points = {e["id"]: (e["metrics"]["add_accuracy"], e["metrics"]["add4_accuracy"]) for e in evals}
    on_front = {m["eval_id"] for m in front["members"]}
    for i in on_front:  # nobody dominates a member; every other evaluation is dominated or a tie
        assert not any(all(q >= p for q, p in zip(points[j], points[i])) and points[j] != points[i]
                       for j in points)
    r = cli("export", str(out), "--prefer", "add=0.2,add4=0.8", "--mergekit", str(tmp_path / "pref.yaml"))
    assert r.returncode == 0, r.stderr
    chosen = int(r.stdout.split("exported evaluation ")[1].split()[0])
    assert chosen in on_front and "Pareto front, preferred" in r.stdout
    score = lambda i: 0.2 * points[i][0] + 0.8 * points[i][1]  # noqa: E731
    assert score(chosen) == max(score(i) for i in on_front)
    r = cli("export", str(out), "--prefer", "mul=1", "--mergekit", str(tmp_path / "x.yaml"))
    assert r.returncode == 2
    assert "'mul' is not an objective of this run; choose from add_accuracy, add4_accuracy" in r.stderr


def test_mismatched_expert_is_refused_before_anything_starts(cli, setup, tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = yaml.safe_load((setup / "cfg.yaml").read_text())
    odd = LlamaForCausalLM(LlamaConfig(vocab_size=43, hidden_size=32, intermediate_size=48, num_hidden_layers=3,
                                       num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=False))
    odd.save_pretrained(tmp_path / "odd")
    cfg["space"]["models"]["experts"]["odd"] = str(tmp_path / "odd")
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    r = cli("--config", str(tmp_path / "c.yaml"), "--out", str(tmp_path / "run"))
    assert r.returncode == 2 and not (tmp_path / "run").exists()
    assert r.stderr.strip().splitlines() == [
        "error: models: expert odd tensor model.layers.0.mlp.down_proj.weight has shape [32, 48], "
        "the base has [32, 64]"]


def test_frank_wolfe_runs_a_taskwise_selection_on_ray_workers(cli, setup, tmp_path):
    cfg = yaml.safe_load((setup / "cfg.yaml").read_text())
    cfg["space"].update(method="task_arithmetic", layer_granularity=0, params={"weight": {"low": 0.0, "high": 1.0}})
    cfg["strategy"] = {"name": "frank_wolfe", "steps": 2}
    cfg["budget"] = {"max_evals": 1000}
    (tmp_path / "fw.yaml").write_text(yaml.safe_dump(cfg))
    out = tmp_path / "run"
    r = cli("--config", str(tmp_path / "fw.yaml"), "--out", str(out), "--no-progress")
    assert r.returncode == 0, r.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["stop_reason"] == "strategy_done" and summary["evaluations"] == 1 + 2 * 3
    evals = sorted((json.loads(line) for line in (out / "evals.jsonl").read_text().splitlines()),
                   key=lambda e: e["id"])  # logged as told: in arrival order
    assert evals[0]["recipe"]["groups"]["all"]["weight"] == [0.0, 0.0, 0.0]  # theta_0: the base model
    first = [e["recipe"]["groups"]["all"]["weight"] for e in evals[1:4]]
    assert first == [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]]  # gamma_0 = 1: straight to each atom
    assert len(summary["strategy"]["chosen"]) == 2


def test_frank_wolfe_gradient_oracle_moves_toward_the_best_aligned_expert(cli, setup, tmp_path):
    cfg = yaml.safe_load((setup / "cfg.yaml").read_text())
    cfg["space"].update(method="task_arithmetic", layer_granularity=2, params={"weight": {"low": 0.0, "high": 1.0}})
    cfg["strategy"] = {"name": "frank_wolfe", "oracle": "gradient", "mode": "layerwise", "steps": 3}
    cfg["budget"] = {"max_evals": 1000}
    (tmp_path / "fw.yaml").write_text(yaml.safe_dump(cfg))
    out = tmp_path / "run"
    r = cli("--config", str(tmp_path / "fw.yaml"), "--out", str(out), "--no-progress")
    assert r.returncode == 0, r.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["stop_reason"] == "strategy_done" and summary["evaluations"] == 3 + 1  # one per step + the last
    evals = sorted((json.loads(line) for line in (out / "evals.jsonl").read_text().splitlines()),
                   key=lambda e: e["id"])
    groups = list(evals[0]["recipe"]["groups"])
    experts = evals[0]["recipe"]["experts"]
    assert evals[0]["recipe"]["groups"][groups[0]]["weight"] == [0.0, 0.0, 0.0]
    for t, (now, nxt) in enumerate(zip(evals, evals[1:])):
        gamma = 2.0 / (t + 2)
        for g in groups:
            grad = [now["metrics"][f"dloss/{g}/{e}"] for e in experts]
            best = grad.index(min(grad))  # the atom best aligned with the negative gradient
            want = [(1 - gamma) * w + gamma * (1.0 if k == best else 0.0)
                    for k, w in enumerate(now["recipe"]["groups"][g]["weight"])]
            assert nxt["recipe"]["groups"][g]["weight"] == pytest.approx(want, abs=1e-6)
    assert all("loss" in e["metrics"] for e in evals)
    assert [len(h["chosen"]) for h in summary["strategy"]["history"]] == [len(groups)] * 3


def test_frank_wolfe_gradient_oracle_needs_a_linear_merge(cli, setup, tmp_path):
    cfg = yaml.safe_load((setup / "cfg.yaml").read_text())
    cfg["strategy"] = {"name": "frank_wolfe", "oracle": "gradient"}
    (tmp_path / "fw.yaml").write_text(yaml.safe_dump(cfg))
    r = cli("--config", str(tmp_path / "fw.yaml"), "--out", str(tmp_path / "run"), "--no-progress")
    assert r.returncode == 2 and not (tmp_path / "run").exists()
    assert r.stderr.strip().splitlines() == [
        "error: space.method: ties: gradients with respect to the merge weights need task_arithmetic or linear "
        "(a merge linear in the weights)"]
