"""Every evaluated candidate's time accounted for: merge_s / transfer_s / score_s measured in the worker,
carried onto the records of evals.jsonl (not on cached or failed ones), their means in summary.json
(also across a resume of a run whose records and checkpoint lack them), and the report's workers.png.
Behaviour only: timing values are checked to be finite and >= 0, never compared with a clock."""
import json
import math
import pickle
import shutil

import numpy as np
import pytest
from test_engine_local import new_run, resume

from evomerge.cli import main
from evomerge.config import RunConfig, validate
from evomerge.engine import TIMING_KEYS, Ledger
from evomerge.report.plots_workers import time_split
from evomerge.report.read import read_run
from evomerge.engine.worker import FitnessWorker

SYNTHETIC = {"seed": 2, "space": {"name": "synthetic", "dim": 4},
             "strategy": {"name": "random"}, "fitness": {"name": "synthetic", "n_examples": 4}}


def config(**over) -> RunConfig:
    return RunConfig.model_validate({**SYNTHETIC, **over})


def worker(**fitness) -> FitnessWorker:
    cfg = config(fitness={"name": "synthetic", "n_examples": 4, **fitness})
    w = FitnessWorker(0, cfg.space, cfg.fitness, cfg.seed, threads=1)
    assert w.start_error is None
    return w


def fails(w: FitnessWorker, x: np.ndarray) -> bool:
    return w.evaluate(x[None])["errors"][0] is not None


def timed(t) -> bool:
    return all(isinstance(v, float) and math.isfinite(v) and v >= 0 for v in t.values())


def test_a_batch_fitness_shares_its_seconds_out_and_a_failed_candidate_claims_none():
    w = worker()
    xs = np.random.default_rng(0).uniform(-1, 1, (4, 4)).astype(np.float32)
    out = w.evaluate(xs)
    assert [set(t) for t in out["timing"]] == [{"score_s"}] * 4 and all(timed(t) for t in out["timing"])
    assert len({t["score_s"] for t in out["timing"]}) == 1  # the batch's seconds / 4, each
    assert sum(t["score_s"] for t in out["timing"]) <= out["seconds"]

    w = worker(fail_rate=0.5)  # a raising candidate: the batch is scored one at a time, its record has no time
    bad = next(i for i, x in enumerate(xs) if fails(w, x))
    out = w.evaluate(xs)
    assert out["timing"][bad] is None and out["errors"][bad] is not None
    assert all(timed(t) and set(t) == {"score_s"} for i, t in enumerate(out["timing"]) if out["errors"][i] is None)


class FakeRuntime:
    """A resident model that reports what its last materialize streamed (None: nothing)."""

    tokenizer = "tok"
    last_transfer_s = None  # declared, as by evomerge.runtime's runtimes ("absent": materialize never sets it)

    def __init__(self, transfer):
        self.transfer = transfer
        self.gradients = 0

    def materialize(self, recipe):
        if recipe["x"][0] > 0.9:
            raise RuntimeError("cannot merge")
        if self.transfer != "absent":
            self.last_transfer_s = self.transfer
        return recipe

    def weight_gradient(self, recipe, loss, materialized):
        assert materialized
        self.gradients += 1
        return float(loss(recipe)), {"g": [0.5]}


class FakeModelFitness:
    def __init__(self, input: str):
        self.input = input  # what the worker dispatches on

    def evaluate_model(self, model, tokenizer):
        return float(model["x"].sum()), np.ones(2), {"m": 1.0}

    def loss_model(self, model, tokenizer):
        return 0.25

    def evaluate_recipe(self, recipe):
        return 0.5, np.ones(2), {}


@pytest.mark.parametrize("transfer", [0.001, None, "absent"])
def test_a_model_fitness_times_the_merge_its_transfers_and_the_scoring(transfer):
    w = worker()
    w.fitness, w.runtime = FakeModelFitness("model"), FakeRuntime(transfer)
    w.extra_metrics = ("weight_gradient",)  # counted in score_s
    w.space.decode = lambda x: {"x": x, "experts": ["a"]}
    xs = np.array([[0.1, 0.2], [0.95, 0.0], [0.3, 0.3]], np.float32)
    out = w.evaluate(xs)
    assert out["errors"][0] is None and out["errors"][1] == "RuntimeError: cannot merge"
    assert out["timing"][1] is None  # failed: no time claimed
    want = {"merge_s", "score_s"} | ({"transfer_s"} if isinstance(transfer, float) else set())
    assert [set(out["timing"][i]) for i in (0, 2)] == [want, want]
    assert all(timed(out["timing"][i]) for i in (0, 2)) and w.runtime.gradients == 2
    assert out["metrics"]["loss"][0] == 0.25


def test_a_recipe_fitness_times_only_the_scoring():
    w = worker()
    w.fitness = FakeModelFitness("recipe")
    out = w.evaluate(np.zeros((2, 4), np.float32))
    assert [set(t) for t in out["timing"]] == [{"score_s"}] * 2 and all(timed(t) for t in out["timing"])


def test_the_engine_state_keeps_the_sums_and_reads_checkpoints_without_them():
    cfg = config()
    ledger = Ledger(cfg.engine, [])
    assert ledger.time_per_candidate() == {}  # nothing measured: summary.json says nothing
    ledger.timing = {"merge_s": [3.0, 3], "transfer_s": [0.5, 2], "score_s": [6.0, 3]}
    assert ledger.time_per_candidate() == {"candidates": 3, "merge_s": 1.0, "transfer_s": 0.25,
                                           "transfer_s_candidates": 2, "score_s": 2.0}
    state = ledger.state_dict()
    fresh = Ledger(cfg.engine, [])
    fresh.load_state_dict(pickle.loads(pickle.dumps(state)))
    assert fresh.time_per_candidate() == ledger.time_per_candidate()
    del state["timing"]  # a checkpoint of an older version
    old = Ledger(cfg.engine, [])
    old.load_state_dict(state)
    assert old.time_per_candidate() == {}


def records(run):
    return [json.loads(line) for line in (run / "evals.jsonl").read_text().splitlines()]


def strip(rec: dict) -> dict:
    return {k: v for k, v in rec.items() if k not in TIMING_KEYS}


@pytest.fixture(scope="module")
def resumed(tmp_path_factory):
    """A run that evaluates seeds (some fail: fail_rate) and copies of them (served from the cache),
    stopped after 16 evaluations, made to look as if an older version had run it (no timing on its
    records or in its checkpoint), and resumed with a larger budget."""
    tmp = tmp_path_factory.mktemp("timing")
    cfg = {"seed": 5, "space": {"name": "synthetic", "dim": 6, "n_seeds": 30},
           "strategy": {"name": "m2n2", "archive_size": 30, "crossover": False, "mutation_std": 0.0},
           "fitness": {"name": "synthetic", "fail_rate": 0.3, "n_examples": 8},
           "engine": {"workers": 2, "batch_size": 2, "cpus_per_worker": 0.5, "max_retries": 0},
           "budget": {"max_evals": 16}}
    out = tmp / "run"
    new_run(out, validate(cfg))  # the in-process pool: the engine's accounting, without Ray
    first = records(out)
    assert len(first) == 16 and any("score_s" in e for e in first)
    (out / "evals.jsonl").write_text("".join(json.dumps(strip(e)) + "\n" for e in first))
    ckpt = pickle.loads((out / "checkpoint.pkl").read_bytes())
    eng = ckpt["engine"]
    assert eng["timing"]["score_s"][1] == sum("score_s" in e for e in first)
    del eng["timing"]
    eng["cache"] = [(k, strip(rec), s) for k, rec, s in eng["cache"]]
    (out / "checkpoint.pkl").write_bytes(pickle.dumps(ckpt))
    resume(out, "budget.max_evals=60")
    return out


def test_records_and_summary_carry_the_time_of_each_evaluated_candidate(resumed):
    recs = records(resumed)
    assert sorted(e["id"] for e in recs) == list(range(60))
    old, new = [e for e in recs if e["id"] < 16], [e for e in recs if e["id"] >= 16]
    assert not any(set(TIMING_KEYS) & set(e) for e in old)  # the older version's records, as they were
    evaluated = [e for e in new if not e.get("failed") and e.get("cached_from") is None]
    others = [e for e in new if e not in evaluated]
    assert evaluated and any(e.get("failed") for e in new) and any(e.get("cached_from") is not None for e in new)
    for e in evaluated:  # a batch fitness: the scoring only, no merge
        assert set(TIMING_KEYS) & set(e) == {"score_s"} and timed({"score_s": e["score_s"]})
    assert not any(set(TIMING_KEYS) & set(e) for e in others)  # cached and failed records claim no time

    summary = json.loads((resumed / "summary.json").read_text())
    assert summary["sessions"] == 2 and summary["evaluations"] == 60
    per = summary["time_per_candidate"]
    assert set(per) == {"candidates", "score_s"} and per["candidates"] == len(evaluated)
    assert per["score_s"] == pytest.approx(np.mean([e["score_s"] for e in evaluated]), abs=2e-6)
    for key in ("worker_utilization", "engine_overhead_ms_per_eval", "cached", "failed"):
        assert key in summary  # the existing fields stay


def test_the_report_shows_the_split_per_worker(resumed, tmp_path):
    from test_report import pngs_of

    assert main(["report", str(resumed)]) == 0
    written, md = pngs_of(resumed / "report")
    row = next(line for line in md.splitlines() if line.startswith("| time per candidate"))
    assert "workers.png" in written and "| score " in row and "merge" not in row and "transfer" not in row
    split = time_split(read_run(resumed))
    assert split and all(set(d) == {"score_s", "other"} and d["other"] >= 0 for d in split.values())

    # a model fitness' records (merge_s, transfer_s) and no summary.json (a run still going): from the records
    model = tmp_path / "model"
    shutil.copytree(resumed, model, ignore=shutil.ignore_patterns("report*", "summary.json"))
    recs = records(model)
    for e in recs:
        if "score_s" in e:
            e.update(merge_s=2 * e["score_s"], transfer_s=e["score_s"])
    (model / "evals.jsonl").write_text("".join(json.dumps(e) + "\n" for e in recs))
    assert main(["report", str(model)]) == 0
    written, md = pngs_of(model / "report")
    row = next(line for line in md.splitlines() if line.startswith("| time per candidate"))
    assert "merge" in row and "transfer (within the merge)" in row and "score" in row
    assert all({"merge_s", "transfer_s", "score_s"} <= set(d) for d in time_split(read_run(model)).values())

    # an older version's run: no timing anywhere, the plot as before
    bare = tmp_path / "bare"
    shutil.copytree(resumed, bare, ignore=shutil.ignore_patterns("report*"))
    (bare / "evals.jsonl").write_text("".join(json.dumps(strip(e)) + "\n" for e in records(bare)))
    s = json.loads((bare / "summary.json").read_text())
    del s["time_per_candidate"]
    (bare / "summary.json").write_text(json.dumps(s))
    assert main(["report", str(bare)]) == 0
    written, md = pngs_of(bare / "report")
    assert "workers.png" in written and "time per candidate" not in md and time_split(read_run(bare)) == {}
