"""One writer per run directory (an OS lock); the private local Ray: listening on loopback only, and no
processes or temp dirs left by a killed driver; strict JSON logs and honest exit codes. (A damaged run
directory is refused by the bad-input corpus, tests/bad_input_cases.py.)"""
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import yaml

from commands import start
from evomerge.engine.cluster import MARK, PREFIX, is_loopback, listeners

ROOT = Path(__file__).resolve().parent.parent


def config(tmp: Path, max_evals: int = 400, delay_ms: float = 1) -> Path:
    cfg = {"seed": 1, "space": {"name": "synthetic", "dim": 6}, "strategy": {"name": "m2n2", "archive_size": 8},
           "fitness": {"name": "synthetic", "delay_ms": delay_ms},
           "engine": {"workers": 2, "batch_size": 4, "cpus_per_worker": 0.5, "checkpoint_every_s": 0.5},
           "budget": {"max_evals": max_evals}, "progress_every_s": 0.5}
    path = tmp / f"cfg-{max_evals}-{delay_ms}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def ids(run: Path) -> list[int]:
    return [json.loads(line)["id"] for line in (run / "evals.jsonl").read_text().splitlines()]


def wait_for(pred, proc: subprocess.Popen, timeout: float = 120) -> None:
    t0 = time.time()
    while time.time() - t0 < timeout:
        if pred():
            return
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.1)
    raise AssertionError("condition not reached")


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    """A finished 400-evaluation run (made in process: the resumes below are the command's, on Ray)."""
    from evomerge.config import load_config
    from test_engine_local import new_run

    tmp = tmp_path_factory.mktemp("finished")
    new_run(tmp / "run", load_config(config(tmp)))
    return tmp / "run"


def test_two_resumes_started_together_one_is_refused(finished, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(finished, run)
    a = start("--resume", str(run), "--set", "budget.max_evals=3000")
    b = start("--resume", str(run), "--set", "budget.max_evals=3000")
    outs = [p.communicate(timeout=300) for p in (a, b)]
    codes = sorted([a.returncode, b.returncode])
    assert codes == [0, 2], outs
    refused = outs[[a.returncode, b.returncode].index(2)][1]
    lines = refused.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: --resume {run}: in use by another evomerge process (pid ")
    logged = ids(run)
    assert len(logged) == len(set(logged)) == 3000
    assert json.loads((run / "summary.json").read_text())["evaluations"] == 3000


def test_a_second_run_with_the_same_out_is_refused_before_start_up(tmp_path):
    out = tmp_path / "run"
    first = start("--config", str(config(tmp_path, 100_000, 1)), "--out", str(out))
    try:
        wait_for(lambda: (out / ".lock").exists() and (out / ".lock").read_text().strip(), first)
        t0 = time.time()
        second = subprocess.run([sys.executable, "run.py", "--config", str(config(tmp_path, 50)), "--out",
                                 str(out)], cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert second.returncode == 2
        assert second.stderr.strip().count("\n") == 0
        assert f"pid {first.pid}" in second.stderr or "already exists and is not empty" in second.stderr
        assert time.time() - t0 < 60  # refused by the lock or the directory, not after Ray's start-up
    finally:
        first.send_signal(signal.SIGINT)
        first.communicate(timeout=120)
    assert first.returncode == 130


def test_local_ray_listens_on_loopback_only_and_a_killed_driver_leaves_nothing(tmp_path):
    out = tmp_path / "run"
    proc = start("--config", str(config(tmp_path, 100_000, 1)), "--out", str(out))
    wait_for(lambda: (out / "evals.jsonl").exists() and (out / "evals.jsonl").stat().st_size > 0, proc)
    listening = listeners(proc.pid)
    names = {name for name, _, _ in listening}
    assert {"raylet", "gcs_server"} <= names and len(listening) >= 4, listening  # + the driver, the workers
    assert [(n, ip) for n, ip, _ in listening if not is_loopback(ip)] == []
    children = psutil.Process(proc.pid).children(recursive=True)
    mark = next(p.environ()[MARK] for p in children if MARK in p.environ())
    assert Path(mark).name.startswith(PREFIX)

    os.kill(proc.pid, signal.SIGKILL)  # the driver alone: Ray's own processes may outlive it
    proc.communicate()
    second = start("--resume", str(out), "--set", "budget.max_evals=200")
    second.communicate(timeout=300)
    assert second.returncode == 0
    assert not Path(mark).exists()
    left = []
    for p in psutil.process_iter():
        try:
            if p.environ().get(MARK) == mark:
                left.append(p)
        except psutil.Error:
            continue
    assert left == []


# honest exits and valid logs ----------------------------------------------------------------------

def strict_json(line: str):
    def refuse(token):
        raise AssertionError(f"bare {token} in a JSON line")

    return json.loads(line, parse_constant=refuse)


def test_non_finite_numbers_are_written_as_null_with_the_reason(tmp_path):
    from evomerge.rundir import dumps

    line = dumps({"id": 3, "fitness": 0.5, "metrics": {"a": float("nan"), "b": 1.0, "c": float("-inf")}})
    rec = strict_json(line)
    assert rec["metrics"] == {"a": None, "b": 1.0, "c": None}
    assert rec["nonfinite"] == {"metrics.a": "nan", "metrics.c": "-inf"}
    assert strict_json(dumps({"id": 1, "fitness": 1.0})) == {"id": 1, "fitness": 1.0}


def test_a_run_with_nan_scores_logs_valid_json_and_reports_it(tmp_path):
    from evomerge.pareto import front_of_run
    from evomerge.report.read import read_run

    from evomerge.config import validate
    from test_engine_local import new_run

    cfg = yaml.safe_load(config(tmp_path, 120).read_text())
    cfg["fitness"].update(nan_rate=0.3, n_tasks=2)
    out = tmp_path / "run"
    new_run(out, validate(cfg))  # the in-process pool: what the engine writes, without Ray
    records = [strict_json(line) for line in (out / "evals.jsonl").read_text().splitlines()]
    assert len(records) == 120 and any(rec.get("failed") for rec in records)
    strict_json((out / "summary.json").read_text())
    assert read_run(out).n == 120
    assert front_of_run(out, ["task0_accuracy", "task1_accuracy"]).members


def test_a_run_in_which_every_evaluation_failed_exits_non_zero(tmp_path):
    cfg = yaml.safe_load(config(tmp_path, 6).read_text())
    cfg["fitness"]["fail_rate"] = 1.0
    cfg["engine"]["max_retries"] = 0
    path = tmp_path / "fail.yaml"
    path.write_text(yaml.safe_dump(cfg))
    r = subprocess.run([sys.executable, "run.py", "--config", str(path), "--out", str(tmp_path / "run"),
                        "--no-progress"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 1, r.stderr
    err = [line for line in r.stderr.splitlines() if line.startswith("error: ")]
    assert len(err) == 1 and "failed" in err[0] and "--resume" in err[0] and "Traceback" not in r.stderr


def test_a_user_error_raised_in_a_starting_worker_stays_one_line(tmp_path):
    """What the driver cannot check (here: a task file gone by the time the workers start) still comes
    out as the worker's own one-line UserError, not Ray's ActorDiedError text or a traceback."""
    from evomerge.config import validate
    from evomerge.engine import RayPool
    from evomerge.errors import UserError

    cfg = validate({"space": {"name": "api_weights", "models": ["a"]}, "strategy": {"name": "random"},
                    "fitness": {"name": "api", "base_url": "http://127.0.0.1:9/v1",
                                "tasks": [{"name": "t", "path": str(tmp_path / "gone.jsonl"), "kind": "generate"}]},
                    "engine": {"workers": 1, "cpus_per_worker": 0.5}})
    pool = RayPool(cfg)
    with pool.session():
        pool.launch()
        with pytest.raises(UserError) as err:
            pool.wait_ready()
    assert type(err.value) is UserError
    assert str(err.value) == f"fitness.tasks[0].path: {tmp_path / 'gone.jsonl'}: no such JSONL file"
