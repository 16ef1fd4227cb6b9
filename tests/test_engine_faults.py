"""Long-run behaviour through the real command on Ray: resume after SIGKILL, Ctrl-C, a worker process
killed. The engine's other fault paths (failures, retries, hangs, duplicates, workers that never start)
run on the in-process pool in test_engine_local.py."""
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from commands import start, synthetic_config
from evomerge.journal import Journal, pack_scores, unpack_scores

ROOT = Path(__file__).resolve().parent.parent


def write_config(tmp_path, **over) -> Path:
    cfg = synthetic_config(fitness_extra={"delay_ms": 2, "delay_sigma": 1.0}, engine_extra={"cpus_per_worker": 0.5},
                           **over)
    path = tmp_path / f"cfg{len(list(tmp_path.glob('cfg*.yaml')))}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def evals(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "evals.jsonl").read_text().splitlines()]


def wait_for_evals(out: Path, n: int, proc: subprocess.Popen, timeout: float = 120) -> None:
    t0 = time.time()
    while time.time() - t0 < timeout:
        f = out / "evals.jsonl"
        if f.exists() and f.read_text().count("\n") >= n:
            return
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.05)
    raise AssertionError(f"fewer than {n} evaluations after {timeout} s")


def kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL the driver; its private Ray processes follow it (they are its children)."""
    import psutil

    children = psutil.Process(proc.pid).children(recursive=True)
    proc.kill()
    proc.communicate()
    _, alive = psutil.wait_procs(children, timeout=20)
    for p in alive:  # only processes this test started
        p.kill()


def run_to_end(cli, *args) -> subprocess.CompletedProcess:
    r = cli(*args, "--no-progress")
    assert r.returncode == 0, r.stderr
    return r


DETERMINISTIC = {"engine__deterministic": True}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted deterministic run, fault-free: what the runs below must repeat. It runs in process
    (InProcessPool): a deterministic run is the same whatever runs its workers, so the Ray runs below are
    checked against it too."""
    from evomerge.config import load_config
    from test_engine_local import new_run

    tmp = tmp_path_factory.mktemp("reference")
    cfg = write_config(tmp, **DETERMINISTIC)
    new_run(tmp / "ref", load_config(cfg))
    return cfg, tmp / "ref"


def assert_same_run(ref: Path, out: Path, n: int) -> None:
    a, b = evals(ref), evals(out)
    assert [e["id"] for e in b] == list(range(n))  # logged once each, in submission order
    assert [(e["key"], e["fitness"]) for e in a] == [(e["key"], e["fitness"]) for e in b]
    assert [e["recipe"] for e in a] == [e["recipe"] for e in b]
    sa, sb = (json.loads((d / "summary.json").read_text()) for d in (ref, out))
    assert sa["best"] == sb["best"] and sb["evaluations"] == n
    assert json.loads((out / "best" / "point.json").read_text())["x"] == b[sb["best"]["eval_id"]]["recipe"]["x"]


def test_deterministic_run_killed_and_resumed_repeats_the_uninterrupted_run(cli, reference):
    cfg, ref = reference
    out = ref.parent / "killed"
    proc = start("--config", str(cfg), "--out", str(out))
    wait_for_evals(out, 250, proc)
    kill_tree(proc)
    r = run_to_end(cli, "--resume", str(out))
    assert "resuming" in r.stderr
    assert_same_run(ref, out, 600)
    assert json.loads((out / "summary.json").read_text())["sessions"] == 2


def test_resume_refuses_changes_other_than_the_budget(cli, tmp_path):
    r = cli("--resume", str(tmp_path), "--set", "strategy.alpha=2")
    assert r.returncode == 2 and "may change only budget" in r.stderr
    r = cli("--resume", str(tmp_path / "nothing"))
    assert r.returncode == 2 and "not a run directory with a checkpoint" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_sigint_checkpoints_and_says_how_to_resume(cli, tmp_path):
    cfg = write_config(tmp_path, fitness={"name": "synthetic", "delay_ms": 20})
    out = tmp_path / "run"
    proc = start("--config", str(cfg), "--out", str(out))
    wait_for_evals(out, 50, proc)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert f"python run.py --resume {out}" in err and "Traceback" not in err
    summary = json.loads((out / "summary.json").read_text())
    assert summary["stop_reason"] == "interrupted"
    logged = [e["id"] for e in evals(out)]
    assert len(logged) == len(set(logged)) == summary["evaluations"]
    run_to_end(cli, "--resume", str(out))
    assert sorted(e["id"] for e in evals(out)) == list(range(600))


def test_a_killed_worker_is_replaced_and_nothing_is_lost_or_repeated(reference):
    cfg, ref = reference
    out = ref.parent / "worker-killed"
    proc = start("--config", str(cfg), "--out", str(out))
    wait_for_evals(out, 100, proc)
    pid = next(json.loads(line)["pid"] for line in (out / "workers.jsonl").read_text().splitlines())
    os.kill(pid, signal.SIGKILL)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    events = [json.loads(line) for line in (out / "workers.jsonl").read_text().splitlines()]
    assert [e["event"] for e in events].count("replaced") == 1
    assert sum(e["event"] == "started" for e in events) == 3
    assert_same_run(ref, out, 600)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["worker_replacements"] == 1 and summary["failed"] == 0


def test_journal_cuts_a_torn_entry_and_scores_pack_exactly(tmp_path):
    j = Journal(tmp_path / "j.bin")
    j.append(("ask", 4, 0, ["a"]))
    j.append(("tell", [({"id": 0}, None)]))
    j.close()
    with open(tmp_path / "j.bin", "ab") as f:
        f.write(b"\x40\x00\x00\x00\x00\x00\x00\x00partial")
    assert Journal.read(tmp_path / "j.bin") == [("ask", 4, 0, ["a"]), ("tell", [({"id": 0}, None)])]
    assert Journal.read(tmp_path / "j.bin") == [("ask", 4, 0, ["a"]), ("tell", [({"id": 0}, None)])]
    for s in (np.array([0.0, 1.0, 1.0, 0.0, 1.0]), np.array([0.5, 0.25]), np.array([0.1, 1 / 3])):
        assert np.array_equal(unpack_scores(pack_scores(s)), s)
    assert len(pack_scores(np.ones(1000))[2]) == 125  # 0/1 scores: one bit each
