"""The engine's behaviour on the in-process worker pool (no Ray): duplicates and the cache, retries and
isolation, failures, workers that die, hang or never start, StopRun, deterministic runs, exact resume
after a killed driver, the logs and the summary. Faults are injected by the workers the pool builds
(see Faults); the real command on Ray is covered by test_engine_faults.py, test_node_loss.py, test_e2e.py."""
import hashlib
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from commands import synthetic_config
from evomerge.cli import _report_end
from evomerge.config import apply_sets, read_yaml, validate
from evomerge.engine import TIMING_KEYS, InProcessPool, WorkerDeath, WorkerHang, search
from evomerge.engine.worker import FitnessWorker
from evomerge.errors import UserError
from evomerge.rundir import RunDir


def config(**over):
    """The synthetic search of test_engine_faults.py (no delays: in process, time is not what is tested)."""
    return validate(synthetic_config(**over))


class DriverKilled(BaseException):
    """Stands for a SIGKILL of the driver: nothing after it runs (no final checkpoint, no summary)."""


def hit(x: np.ndarray, rate: float, salt: bytes = b"") -> bool:
    """A share `rate` of candidates, picked by their vector (the same at every attempt)."""
    return int.from_bytes(hashlib.sha256(salt + x.tobytes()).digest()[:4], "little") < rate * 2 ** 32


class Faults:
    """The make_worker of an InProcessPool, with faults: the first incarnation of worker w dies on its
    `die_on[w]`-th batch, or hangs on its `hang_on[w]`-th; a share `poison` of candidates kills any worker
    that scores it, a share `stall` hangs it (every attempt); the workers in `absent` never start, the
    replacements of those in `no_replacement` never start; a share `flaky` of candidates fails its first
    attempt only (a transient error), whichever worker scores it; the driver is killed (DriverKilled) once more
    than `kill_after` candidates were scored; every candidate after `stop_after` is refused with StopRun."""

    def __init__(self, die_on=None, hang_on=None, poison=0.0, stall=0.0, absent=(), no_replacement=(),
                 kill_after=None, stop_after=None, flaky=0.0):
        self.die_on, self.hang_on = die_on or {}, hang_on or {}
        self.poison, self.stall, self.flaky = poison, stall, flaky
        self.flaked: set[bytes] = set()
        self.absent, self.no_replacement = set(absent), set(no_replacement)
        self.kill_after, self.stop_after = kill_after, stop_after
        self.spawned = Counter()
        self.scored = 0

    def __call__(self, index, *args, **kwargs):
        incarnation = self.spawned[index]
        self.spawned[index] += 1
        if index in self.absent or (incarnation and index in self.no_replacement):
            raise WorkerHang
        return FaultyWorker(self, incarnation, index, *args, **kwargs)

    def pool(self, cfg):
        return InProcessPool(cfg, make_worker=self)


class FaultyWorker(FitnessWorker):
    def __init__(self, faults: Faults, incarnation: int, *args, **kwargs):
        self.faults, self.incarnation, self.calls = faults, incarnation, 0
        super().__init__(*args, **kwargs)

    def evaluate(self, batch, examples=None):
        f = self.faults
        self.calls += 1
        first = self.incarnation == 0
        if (first and f.die_on.get(self.index) == self.calls) or any(hit(x, f.poison) for x in batch):
            raise WorkerDeath("killed")
        if (first and f.hang_on.get(self.index) == self.calls) or any(hit(x, f.stall, b"s") for x in batch):
            raise WorkerHang
        if f.kill_after is not None and f.scored + len(batch) > f.kill_after:
            raise DriverKilled
        out = super().evaluate(batch, examples)
        for j, x in enumerate(batch):
            if hit(x, f.flaky, b"f") and x.tobytes() not in f.flaked and out["errors"][j] is None:
                f.flaked.add(x.tobytes())
                out["errors"][j] = "RuntimeError: transient failure (first attempt)"
        if f.stop_after is not None and f.scored + len(batch) > f.stop_after:
            keep = max(f.stop_after - f.scored, 0)
            out["errors"] = [e if j < keep else "StopRun: API budget spent" for j, e in enumerate(out["errors"])]
        f.scored += len(batch)
        return out


def new_run(out: Path, cfg, pool=InProcessPool) -> dict:
    run = RunDir.claim(out)
    try:
        return search(cfg, run, progress=False, pool=pool)
    finally:
        run.close()


def resume(out: Path, *sets: str, pool=InProcessPool) -> dict:
    run = RunDir.open(out)
    try:
        cfg = validate(apply_sets(read_yaml(run.config_file), list(sets)))
        return search(cfg, run, resume=True, config_changed=bool(sets), progress=False, pool=pool)
    finally:
        run.close()


def killed_run(out: Path, cfg, after: int) -> None:
    """A run whose driver is killed after `after` candidates were scored."""
    with pytest.raises(DriverKilled):
        new_run(out, cfg, Faults(kill_after=after).pool)
    assert not (out / "summary.json").exists()


def evals(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "evals.jsonl").read_text().splitlines()]


def events(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "workers.jsonl").read_text().splitlines()]


def summary_of(out: Path) -> dict:
    return json.loads((out / "summary.json").read_text())


DETERMINISTIC = {"engine__deterministic": True}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted, fault-free deterministic run: what the deterministic runs below repeat."""
    out = tmp_path_factory.mktemp("reference") / "ref"
    new_run(out, config(**DETERMINISTIC))
    return out


def assert_same_run(ref: Path, out: Path, n: int = 600) -> None:
    a, b = evals(ref), evals(out)
    assert [e["id"] for e in b] == list(range(n))  # logged once each, in submission order
    assert [(e["key"], e["fitness"], e["recipe"]) for e in a] == [(e["key"], e["fitness"], e["recipe"]) for e in b]
    sa, sb = summary_of(ref), summary_of(out)
    assert sa["best"] == sb["best"] and sb["evaluations"] == n
    assert json.loads((out / "best" / "point.json").read_text())["x"] == b[sb["best"]["eval_id"]]["recipe"]["x"]


# resume ---------------------------------------------------------------------------------------------

def test_a_killed_deterministic_run_resumed_repeats_the_uninterrupted_run(reference, tmp_path):
    out = tmp_path / "run"
    killed_run(out, config(**DETERMINISTIC), after=250)
    assert 0 < len(evals(out)) <= 250
    resume(out)
    assert_same_run(reference, out)
    assert summary_of(out)["sessions"] == 2


def test_a_free_running_resume_logs_every_evaluation_exactly_once(tmp_path):
    out = tmp_path / "run"
    killed_run(out, config(budget={"max_evals": 300}), after=120)
    with open(out / "evals.jsonl", "a") as f:  # a torn last line: cut off, that evaluation logged again
        f.write('{"id": 99999, "fitn')
    s = resume(out, "budget.max_evals=450")
    assert sorted(e["id"] for e in evals(out)) == list(range(450))
    assert s["evaluations"] == 450 and s["stop_reason"] == "max_evals" and s["sessions"] == 2
    assert "max_evals: 450" in (out / "config.yaml").read_text()
    t = [e["t"] for e in evals(out)]
    assert min(t[120:]) >= 0  # time stamps of the second session go on from the first


def test_a_finished_run_resumed_with_a_larger_budget_goes_on(reference, tmp_path):
    import shutil

    out = tmp_path / "run"
    shutil.copytree(reference, out)
    s = resume(out, "budget.max_evals=700")
    assert [e["id"] for e in evals(out)] == list(range(700)) and s["evaluations"] == 700 and s["sessions"] == 2


# duplicates, failures, retries --------------------------------------------------------------------------

@pytest.mark.parametrize("deterministic", [False, True])
def test_duplicate_candidates_are_served_from_the_cache(tmp_path, deterministic):
    # without crossover or mutation every child is a copy of an archive member
    cfg = config(strategy={"name": "m2n2", "archive_size": 4, "crossover": False, "mutation_std": 0.0},
                 budget={"max_evals": 100}, engine__deterministic=deterministic)
    s = new_run(tmp_path / "run", cfg)
    log = evals(tmp_path / "run")
    assert len({e["key"] for e in log}) == 4  # the four seeds, evaluated once each
    cached = [e for e in log if "cached_from" in e]
    assert len(cached) == 96 and s["cached"] == 96
    by_id = {e["id"]: e for e in log}
    assert all(e["fitness"] == by_id[e["cached_from"]]["fitness"] and e["key"] == by_id[e["cached_from"]]["key"]
               for e in cached)
    assert not any(set(TIMING_KEYS) & set(e) for e in cached)  # a served record claims no time


def test_failures_are_logged_with_reasons_retried_and_penalised(tmp_path):
    cfg = config(fitness={"name": "synthetic", "fail_rate": 0.04, "nan_rate": 0.04, "flaky_rate": 0.02},
                 strategy={"name": "cmaes", "popsize": 8, "x0": "center"},
                 engine__failure_penalty=-5.0, engine__max_retries=1, engine__eval_timeout_s=0.3,
                 engine__workers=3, budget={"max_evals": 200}, **DETERMINISTIC)
    out = tmp_path / "run"
    s = new_run(out, cfg, Faults(poison=0.04, stall=0.04, flaky=0.05).pool)
    log = evals(out)
    assert [e["id"] for e in log] == list(range(200))
    failed = [e for e in log if e.get("failed")]
    reasons = {e["error"].split(":")[0] for e in failed}
    assert {"ValueError", "fitness is nan", "timeout"} <= reasons  # raised / NaN / hung
    assert any("died" in e["error"] for e in failed)  # the killing candidates, after their retry
    raised = [e for e in failed if e["error"].startswith(("ValueError", "timeout"))]
    assert all(e["attempts"] == 2 for e in raised)  # first try plus max_retries=1
    assert all(e["fitness"] is None for e in failed)
    assert any(e.get("attempts") == 2 and not e.get("failed") for e in log)  # flaky ones succeeded on retry
    assert s["failed"] == len(failed) and s["retried"] > 0
    assert s["timeouts"] >= 2 and s["worker_replacements"] > s["timeouts"]
    assert s["best"]["fitness"] == max(e["fitness"] for e in log if not e.get("failed"))


def test_a_candidate_that_kills_its_worker_is_isolated_and_the_rest_of_its_batch_is_scored(tmp_path):
    cfg = config(strategy={"name": "random"}, engine__max_retries=2, budget={"max_evals": 120})
    out = tmp_path / "run"
    faults = Faults(poison=0.03)
    s = new_run(out, cfg, faults.pool)
    log = evals(out)
    killers = [e for e in log if e.get("failed")]
    assert killers and all("died" in e["error"] and e["attempts"] == 3 for e in killers)
    assert all(hit(np.asarray(e["recipe"]["x"], np.float32), 0.03) for e in killers)  # only they failed
    # each killer: one death in its batch (not an attempt: the batch is re-sent one per call), then 3 alone
    assert s["failed"] == len(killers) and len(killers) * 3 < s["worker_replacements"] <= len(killers) * 4
    assert [e["event"] for e in events(out)].count("replaced") == s["worker_replacements"]


def test_a_broken_fitness_stops_the_run_early_with_one_clear_line(tmp_path, capsys):
    for i, strategy in enumerate(({"name": "random"}, {"name": "m2n2"})):  # m2n2: no seed can be scored
        cfg = config(fitness={"name": "synthetic", "fail_rate": 1.0}, strategy=strategy, engine__max_retries=0)
        out = tmp_path / f"run{i}"
        s = new_run(out, cfg)
        assert s["stop_reason"] == "too_many_failures" and s["evaluations"] < 40
        capsys.readouterr()
        assert _report_end(s, cfg, out) == 1
        line = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("error:")]
        assert len(line) == 1 and "engine.max_failure_fraction" in line[0] and "ValueError" in line[0]


def test_too_many_worker_replacements_end_the_run_with_a_user_error(tmp_path):
    cfg = config(strategy={"name": "random"}, engine__max_worker_replacements=3, budget={"max_evals": 100})
    with pytest.raises(UserError, match="engine.max_worker_replacements: workers were replaced 4 times"):
        new_run(tmp_path / "run", cfg, Faults(poison=1.0).pool)


# workers that die, hang or never start ------------------------------------------------------------------

def test_a_worker_that_dies_or_hangs_is_replaced_and_nothing_is_lost_or_repeated(reference, tmp_path):
    out = tmp_path / "run"
    cfg = config(engine__eval_timeout_s=0.3, **DETERMINISTIC)
    s = new_run(out, cfg, Faults(die_on={0: 10}, hang_on={1: 20}).pool)
    log = events(out)
    assert [e["event"] for e in log].count("replaced") == 2 and sum(e["event"] == "started" for e in log) == 4
    assert any("died" in e["reason"] for e in log if e["event"] == "replaced")
    assert any(e["reason"].startswith("timeout") for e in log if e["event"] == "replaced")
    assert_same_run(reference, out)
    assert s["worker_replacements"] == 2 and s["timeouts"] == 1 and s["failed"] == 0 and s["workers_live"] == 2


def test_a_replacement_that_never_starts_is_given_up_and_the_run_goes_on(tmp_path, capsys):
    out = tmp_path / "run"
    # 2 ms an evaluation: the run outlasts the replacement's 0.2 s to start (in process, it could end first)
    cfg = config(engine__workers=3, engine__worker_start_timeout_s=0.2, fitness={"name": "synthetic", "delay_ms": 2},
                 **DETERMINISTIC)
    s = new_run(out, cfg, Faults(die_on={1: 5}, no_replacement={1}).pool)
    assert [e["id"] for e in evals(out)] == list(range(600))
    assert s["stop_reason"] == "max_evals" and s["failed"] == 0 and s["worker_replacements"] == 1
    assert s["workers"] == 3 and s["workers_live"] == 2 and s["workers_given_up"] == 1
    given = [e for e in events(out) if e["event"] == "given_up"]
    assert [e["worker"] for e in given] == [1] and "engine.worker_start_timeout_s" in given[0]["reason"]
    assert "replacement worker 1 not started within 0.2 s" in capsys.readouterr().err


def test_losing_every_worker_stops_the_run_and_it_resumes_with_fewer(tmp_path, capsys):
    out = tmp_path / "run"
    cfg = config(engine__workers=2, engine__worker_start_timeout_s=0.2, **DETERMINISTIC)
    s = new_run(out, cfg, Faults(die_on={0: 3, 1: 4}, no_replacement={0, 1}).pool)
    assert s["stop_reason"] == "no_workers" and s["evaluations"] < 600 and "best" not in s
    assert s["workers_live"] == 0 and s["workers_given_up"] == 2 and "not started within" in s["last_failure"]
    capsys.readouterr()
    assert _report_end(s, cfg, out) == 1
    err = capsys.readouterr().err
    assert "no worker is left" in err and f"--resume {out}" in err
    logged = [e["id"] for e in evals(out)]
    assert len(logged) == len(set(logged)) == s["evaluations"]

    # resumed where one of the two workers cannot start: it is given up at start-up
    s = resume(out, pool=Faults(absent={1}).pool)
    assert [e["id"] for e in evals(out)] == list(range(600))  # each exactly once, in submission order
    assert s["stop_reason"] == "max_evals" and s["sessions"] == 2 and s["failed"] == 0
    assert s["workers_live"] == 1 and s["workers_given_up"] == 1 and "best" in s
    assert "1 of 2 workers not started" in capsys.readouterr().err


# stopping ------------------------------------------------------------------------------------------------

def test_stop_run_from_the_fitness_stops_cleanly_and_the_run_resumes(tmp_path):
    out = tmp_path / "run"
    s = new_run(out, config(**DETERMINISTIC), Faults(stop_after=100).pool)
    assert s["stop_reason"] == "fitness_stop" and s["last_failure"].startswith("StopRun:")
    assert s["failed"] == 0 and s["evaluations"] <= 100 and "best" in s
    assert [e["id"] for e in evals(out)] == list(range(s["evaluations"]))  # refused ones: asked, not told
    s = resume(out)
    assert s["stop_reason"] == "max_evals" and [e["id"] for e in evals(out)] == list(range(600))


def test_a_time_budget_stops_the_run(tmp_path):
    out = tmp_path / "run"
    s = new_run(out, config(fitness={"name": "synthetic", "delay_ms": 5}, budget={"max_evals": None,
                                                                              "max_seconds": 0.5}))
    assert s["stop_reason"] == "max_seconds" and s["evaluations"] > 0
    assert len(evals(out)) == s["evaluations"]


# the logs and the summary ---------------------------------------------------------------------------------

def test_logs_stats_timing_and_summary(reference):
    log = evals(reference)
    assert all(set(e) == {"id", "step", "key", "fitness", "metrics", "worker", "seconds", "t", "score_s", "recipe"}
               for e in log)
    assert {e["worker"] for e in log} == {0, 1}  # both workers took batches
    stats = [json.loads(line) for line in (reference / "strategy.jsonl").read_text().splitlines()]
    told = [line["evals"] for line in stats]
    assert told == sorted(set(told)) and told[-1] == 600 and len(told) <= 600 // 2 + 1  # max_evals / 500 per line
    assert all(set(line) >= {"evals", "t"} for line in stats)
    s = summary_of(reference)
    for key in ("stop_reason", "evaluations", "search_seconds", "startup_seconds", "evals_per_second", "sessions",
                "workers", "workers_live", "workers_given_up", "worker_devices", "batch_size", "deterministic",
                "worker_utilization", "driver_cpu_ms_per_eval", "engine_overhead_ms_per_eval", "failed",
                "retried", "cached", "timeouts", "worker_replacements", "time_per_candidate", "best", "strategy",
                "driver_peak_rss_mb", "worker_peak_rss_mb", "total_seconds"):
        assert key in s, key
    assert s["stop_reason"] == "max_evals" and s["worker_devices"] == ["cpu", "cpu"] and s["sessions"] == 1
    assert s["time_per_candidate"]["candidates"] == 600 and set(s["time_per_candidate"]) == {"candidates", "score_s"}
    assert s["best"]["fitness"] == max(e["fitness"] for e in log)
    assert [e["event"] for e in events(reference)] == ["started", "started"]


@pytest.mark.parametrize("scoring", [None, {"subsample": 96, "race": {"first": 0.34, "min_first": 8}}])
def test_a_killed_deterministic_cmaes_run_resumed_repeats_the_uninterrupted_one(tmp_path, scoring):
    """CMA-ES sampling generations ahead (its default overlap), alone and with subsets and racing (raced
    candidates in flight or waiting for their cohort when the driver dies)."""
    over = dict(strategy={"name": "cmaes", "popsize": 8, "x0": "center", "sigma0": 1.0}, **DETERMINISTIC)
    if scoring:
        over.update(scoring=scoring, fitness={"name": "synthetic", "n_examples": 128})
    ref = tmp_path / "ref"
    new_run(ref, config(**over))
    for after in (97, 250):
        out = tmp_path / f"run{after}"
        killed_run(out, config(**over), after=after)
        resume(out)
        assert_same_run(ref, out)
        if scoring:
            assert any(e.get("raced") for e in evals(ref))
            assert [e.get("raced") for e in evals(out)] == [e.get("raced") for e in evals(ref)]
            assert (out / "subsets.jsonl").exists()
