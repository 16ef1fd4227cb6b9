"""Cheaper fitness through example subsets and racing (evomerge/subsets.py, `scoring` in the run config):
the draws are stratified and reproducible, every score says which examples it used, the best is
scored on every example before it is reported or saved, racing never stops a candidate that ranks
where the strategy looks, and configs that cannot work are refused in one line."""
import json
from pathlib import Path

import numpy as np
import pytest

from commands import synthetic_config
from evomerge.config import ScoringConfig, validate
from evomerge.engine import InProcessPool, search
from evomerge.engine.factory import check_scoring
from evomerge.errors import UserError
from evomerge.fitness.synthetic import SyntheticFitness, SyntheticFitnessConfig
from evomerge.rundir import RunDir
from evomerge.subsets import ExamplePlan, race_stops


def run(out: Path, **over) -> dict:
    cfg = validate(synthetic_config(**over))
    rd = RunDir.claim(out)
    try:
        return search(cfg, rd, progress=False, pool=InProcessPool)
    finally:
        rd.close()


def records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "evals.jsonl").read_text().splitlines()]


def subsets(out: Path) -> dict[int, list[int]]:
    return {d["draw"]: d["indices"] for d in map(json.loads, (out / "subsets.jsonl").read_text().splitlines())}


CMAES = {"name": "cmaes", "popsize": 8, "x0": "center"}


def test_a_draw_is_stratified_by_task_and_fixed_by_seed_and_cohort():
    plan = ExamplePlan([40, 20, 4], ScoringConfig(subsample=0.25, race={"first": 0.5, "min_first": 4}), seed=7)
    ex, first = plan.draw(3)
    assert ex.size == 16 and first.size == 8
    assert set(first) <= set(ex) and list(ex) == sorted(ex)
    per_task = [np.sum((ex >= lo) & (ex < hi)) for lo, hi in ((0, 40), (40, 60), (60, 64))]
    assert per_task == [10, 5, 1]  # in proportion to the tasks' sizes
    again, _ = ExamplePlan([40, 20, 4], ScoringConfig(subsample=0.25), seed=7).draw(3)
    assert list(again) == list(ex)
    assert list(plan.draw(4)[0]) != list(ex)
    fixed = ExamplePlan([40, 20, 4], ScoringConfig(subsample=16, resample=False), seed=7)
    assert list(fixed.draw(3)[0]) == list(fixed.draw(9)[0])


def test_a_subset_score_is_the_full_score_at_its_examples():
    f = SyntheticFitness(SyntheticFitnessConfig(name="synthetic", n_examples=12, n_tasks=3))
    x = np.random.default_rng(0).uniform(-1, 1, (2, 5)).astype(np.float32)
    full, part = f.evaluate(x), f.evaluate(x, np.array([0, 5, 6, 11]))
    np.testing.assert_allclose(part.scores, full.scores[:, [0, 5, 6, 11]])
    np.testing.assert_allclose(part.metrics["task1_accuracy"], full.scores[:, [5, 6]].mean(axis=1))
    with pytest.raises(ValueError, match="sorted unique"):
        f.evaluate(x, np.array([5, 0]))


def test_subsets_are_recorded_reproducible_and_the_best_is_scored_on_every_example(tmp_path):
    over = dict(strategy=CMAES, scoring={"subsample": 8, "verify_top": 3}, budget={"max_evals": 96},
                engine={"workers": 2, "batch_size": 4, "deterministic": True, "checkpoint_every_s": 0.5})
    s = run(tmp_path / "a", **over)
    recs, draws = records(tmp_path / "a"), subsets(tmp_path / "a")
    assert all(r["estimate"] and r["examples"]["n"] == 8 for r in recs)
    assert all(len(draws[r["examples"]["draw"]]) == 8 for r in recs)
    by_step = {}
    for r in recs:  # one subset per generation
        by_step.setdefault(r["step"], set()).add(r["examples"]["draw"])
    assert all(len(d) == 1 for d in by_step.values()) and len(by_step) == 12
    # the reported best is a full-split score of a verified estimate, and it is what best/ holds
    sc = s["scoring"]
    assert sc["examples_scored"] == 96 * 8 + 3 * 32 and sc["estimated"] == 96
    assert [v["eval_id"] for v in sc["verified"]] and s["best"]["eval_id"] in [v["eval_id"] for v in sc["verified"]]
    best = next(r for r in recs if r["id"] == s["best"]["eval_id"])
    x = np.array(best["recipe"]["x"], np.float32)[None]
    full = SyntheticFitness(SyntheticFitnessConfig(name="synthetic")).evaluate(x).fitness[0]
    assert s["best"]["fitness"] == pytest.approx(full, abs=1e-6)
    assert s["best"]["scored_on"] == "all examples"
    assert json.loads((tmp_path / "a" / "best" / "point.json").read_text())["info"]["fitness"] == pytest.approx(full)
    run(tmp_path / "b", **over)
    assert [r["examples"] for r in records(tmp_path / "b")] == [r["examples"] for r in recs]
    assert subsets(tmp_path / "b") == draws


def true_top(scores: np.ndarray, keep: int) -> set[int]:
    means = scores.mean(axis=1)
    cut = np.sort(means)[::-1][keep - 1]
    return {i for i in range(len(means)) if means[i] >= cut}


@pytest.mark.parametrize("seed", range(40))
def test_racing_never_stops_a_candidate_whose_full_score_ranks_in_the_kept_part(seed):
    """A cohort of 12 related candidates (a shared base pattern, each flipping a few examples), 0/1 scores
    on 192 examples, known in full; racing sees a random slice of 48. keep: CMA-ES's mu for popsize 12."""
    rng = np.random.default_rng(seed)
    n, size, keep = 192, 12, 6
    base = rng.random(n) < rng.uniform(0.3, 0.7)
    scores = np.empty((size, n))
    for i in range(size):
        flips = rng.random(n) < rng.uniform(0.02, 0.4)
        scores[i] = np.where(flips, rng.random(n) < rng.uniform(0, 1), base)
    slice_ = np.sort(rng.choice(n, 48, replace=False))
    stops = race_stops({i: scores[i, slice_] for i in range(size)}, n, keep, 0.99, size)
    assert not stops & true_top(scores, keep)


def test_racing_stops_the_clearly_worse_and_finishes_the_rest(tmp_path):
    rng = np.random.default_rng(0)
    good = (rng.random(192) < 0.9).astype(float)
    bad = (rng.random(192) < 0.1).astype(float)
    cohort = {i: good for i in range(4)} | {i: bad for i in range(4, 8)}
    assert race_stops({i: v[:48] for i, v in cohort.items()}, 192, 4, 0.99, 8) == {4, 5, 6, 7}


def test_a_raced_run_tells_slice_estimates_marked_and_scores_fewer_examples(tmp_path):
    over = dict(strategy={**CMAES, "sigma0": 1.0}, scoring={"race": {"first": 0.25, "min_first": 8}},
                fitness={"name": "synthetic", "n_examples": 128}, budget={"max_evals": 160},
                engine={"workers": 2, "batch_size": 2, "deterministic": True, "checkpoint_every_s": 0.5})
    s = run(tmp_path / "a", **over)
    recs, draws = records(tmp_path / "a"), subsets(tmp_path / "a")
    raced = [r for r in recs if r.get("raced")]
    assert raced and all(r["estimate"] and r["examples"]["n"] == 32 for r in raced)
    assert all(len(draws[r["examples"]["draw"]]) == 32 for r in raced)
    full = [r for r in recs if not r.get("raced")]
    assert full and all("examples" not in r for r in full)  # finished: every example
    sc = s["scoring"]
    assert sc["raced"] == len(raced)
    # a finished candidate is scored on the rest of its examples only: 32 + 96
    assert sc["examples_scored"] == len(raced) * 32 + len(full) * 128 + len(sc["verified"]) * 128
    finished = next(r for r in full if r["step"] == raced[0]["step"])  # its fitness: the 128 examples' mean
    x = np.array(finished["recipe"]["x"], np.float32)[None]
    assert finished["fitness"] == pytest.approx(
        SyntheticFitness(SyntheticFitnessConfig(name="synthetic", n_examples=128)).evaluate(x).fitness[0])
    assert s["best"]["scored_on"] == "all examples"
    run(tmp_path / "b", **over)  # deterministic: the same decisions
    assert [(r["id"], r.get("raced"), r["fitness"]) for r in records(tmp_path / "b")] == \
        [(r["id"], r.get("raced"), r["fitness"]) for r in recs]


@pytest.mark.parametrize("scoring, strategy, message", [
    ({"subsample": 8}, {"name": "m2n2", "archive_size": 8}, "scoring.resample: m2n2 compares"),
    ({"race": {}}, {"name": "m2n2", "archive_size": 8}, "scoring.race: strategy m2n2 does not rank"),
    ({"race": {}}, {"name": "random"}, "scoring.race: strategy random does not rank"),
])
def test_scoring_a_strategy_cannot_use_is_refused_in_one_line(scoring, strategy, message):
    cfg = validate(synthetic_config(strategy=strategy, scoring=scoring))
    with pytest.raises(UserError, match=message):
        check_scoring(cfg)


def test_m2n2_takes_one_subset_for_the_run(tmp_path):
    s = run(tmp_path / "a", scoring={"subsample": 8, "resample": False}, budget={"max_evals": 60})
    recs = records(tmp_path / "a")
    assert len({r["examples"]["draw"] for r in recs}) == 1
    assert s["best"]["scored_on"] == "all examples"


def test_a_fitness_that_cannot_score_subsets_is_refused():
    cfg = validate({"space": {"name": "digits_mlp"}, "strategy": {"name": "random"},
                    "fitness": {"name": "digits"}, "scoring": {"subsample": 0.5}})
    with pytest.raises(UserError, match="scoring.subsample: fitness digits cannot score a subset"):
        check_scoring(cfg)


def test_the_report_says_what_was_estimated_and_that_the_best_is_a_full_score(tmp_path):
    from evomerge.cli import main

    run(tmp_path / "a", strategy=CMAES, scoring={"subsample": 8}, budget={"max_evals": 48})
    assert main(["report", str(tmp_path / "a")]) == 0
    text = (tmp_path / "a" / "report" / "report.md").read_text()
    assert "| examples scored | " in text and "48 estimates told (subset of 8)" in text
    assert "scored on all examples" in text


def test_from_scores_gives_what_evaluate_gives_on_the_same_examples():
    cfg = SyntheticFitnessConfig(name="synthetic", n_examples=12, n_tasks=3)
    f = SyntheticFitness(cfg)
    x = np.random.default_rng(1).uniform(-1, 1, (1, 5)).astype(np.float32)
    counts = SyntheticFitness.example_counts(cfg)
    for ex in (None, np.array([0, 1, 5, 9, 10]), np.array([2, 3])):
        ev = f.evaluate(x, ex) if ex is not None else f.evaluate(x)
        fit, metrics = SyntheticFitness.from_scores(cfg, counts, ex, ev.scores[0])
        assert fit == pytest.approx(ev.fitness[0])
        assert metrics == pytest.approx({k: v[0] for k, v in ev.metrics.items()})


def test_task_summary_weighs_the_tasks_present():
    from evomerge.fitness.base import task_summary

    fit, m = task_summary(["a", "b", "c"], [1.0, 3.0, 1.0], [2, 2, 2], np.array([0, 1, 2]), np.array([1.0, 0.0, 1.0]))
    assert m == {"a_accuracy": 0.5, "b_accuracy": 1.0} and fit == pytest.approx((0.5 + 3.0) / 4)
