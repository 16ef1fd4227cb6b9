"""End to end through the real command: Ray workers, run directory, best model, every shipped config."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file

from evomerge.demos import digits

ROOT = Path(__file__).resolve().parent.parent


def test_quickstart_with_two_ray_workers(cli, tmp_path):
    out = tmp_path / "run"
    r = cli("--config", "configs/quickstart.yaml", "--set", "budget.max_evals=400", "--set", "engine.batch_size=8",
            "--out", str(out))
    assert r.returncode == 0, r.stderr
    assert f"run directory: {out}" in r.stdout
    assert "evals 400/400" in r.stderr  # plain progress lines when not on a terminal

    config = yaml.safe_load((out / "config.yaml").read_text())
    assert config["budget"]["max_evals"] == 400 and config["strategy"]["archive_size"] == 20  # resolved

    evals = [json.loads(line) for line in (out / "evals.jsonl").read_text().splitlines()]
    assert sorted(e["id"] for e in evals) == list(range(400))
    assert {e["worker"] for e in evals} == {0, 1}  # both workers took batches
    assert set(evals[0]) == {"id", "step", "fitness", "metrics", "worker", "seconds", "t", "score_s"}
    assert all(e["fitness"] == e["metrics"]["train_accuracy"] for e in evals)

    summary = json.loads((out / "summary.json").read_text())
    assert summary["evaluations"] == 400 and summary["stop_reason"] == "max_evals"
    best = summary["best"]
    assert best["fitness"] == max(e["fitness"] for e in evals)
    assert best["fitness"] > max(e["fitness"] for e in evals if e["step"] < 2)  # merging beat both experts
    assert 0 < summary["worker_utilization"] <= 1 and summary["evals_per_second"] > 0

    # best/ holds the model: loading it reproduces the reported train and test accuracy
    tensors = load_file(str(out / "best" / "model.safetensors"))
    x = digits.flatten(tensors)
    train, test = digits.load()
    assert digits.BatchScorer(train).correct(x).mean() == pytest.approx(best["fitness"])
    assert digits.BatchScorer(test).correct(x).mean() == pytest.approx(best["holdout"]["test_accuracy"])
    pred = (torch.relu(torch.from_numpy(test.x) @ tensors["W1"] + tensors["b1"]) @ tensors["W2"] + tensors["b2"])
    assert np.mean(pred.argmax(1).numpy() == test.y) == pytest.approx(best["holdout"]["test_accuracy"])
    assert "load_file" in (out / "best" / "README.md").read_text()
