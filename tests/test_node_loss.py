"""Losing a node does not hang the run (issue 13, item 8): a two-node Ray cluster on this machine, the
real command joined to it, and the second node removed mid-run.

The candidates of the lost workers go to the surviving ones; their replacements, for which no node has
room, are given up after engine.worker_start_timeout_s and the run finishes with fewer workers. With
no worker left, the run stops by itself and resumes (on the in-process pool: test_engine_local.py)."""
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml

# before Ray is imported: every Ray process of the test cluster (and the driver that joins it) resolves
# this node's address to 127.0.0.1, so each of its listeners is on loopback
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

ROOT = Path(__file__).resolve().parent.parent
START_TIMEOUT_S = 3  # engine.worker_start_timeout_s: a replacement with no room is given up after this
RUN_TIMEOUT_S = 240  # generous: a hung run fails the test instead of hanging it


@pytest.fixture(scope="module")
def cluster():
    """A head node with 2 CPUs; each test adds (and removes) its other nodes."""
    from ray._private import ray_constants
    from ray.cluster_utils import Cluster

    tmp = tempfile.mkdtemp(prefix="evt-", dir="/tmp")  # short: Ray's socket paths must fit
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RAY_TMPDIR", tmp)  # the cluster's sessions and address file, not /tmp/ray
        mp.setattr(ray_constants, "ENABLE_RAY_CLUSTER", False)  # also if Ray was imported before
        c = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "include_dashboard": False})
        try:
            assert c.address.startswith("127.0.0.1:"), c.address
            yield c
        finally:
            c.shutdown()
            shutil.rmtree(tmp, ignore_errors=True)


def write_config(path: Path, **engine) -> Path:
    cfg = {"seed": 3, "space": {"name": "synthetic", "dim": 8},
           "strategy": {"name": "m2n2", "archive_size": 8},
           "fitness": {"name": "synthetic", "delay_ms": 25},
           "engine": {"workers": 4, "batch_size": 4, "cpus_per_worker": 1, "threads_per_worker": 1,
                      "checkpoint_every_s": 0.5, "worker_start_timeout_s": START_TIMEOUT_S, **engine},
           "budget": {"max_evals": 800}, "progress_every_s": 0.5}
    path.write_text(yaml.safe_dump(cfg))
    return path


class Run:
    """The real command in a subprocess; its output goes to files (no pipe to fill)."""

    def __init__(self, tmp: Path, *args: str):
        self.err_path = tmp / f"stderr{len(list(tmp.glob('stderr*')))}.txt"
        self.err = open(self.err_path, "w")
        self.proc = subprocess.Popen([sys.executable, "run.py", *args, "--no-progress"], cwd=ROOT, text=True,
                                     stdout=subprocess.DEVNULL, stderr=self.err)

    def wait_for_evals(self, out: Path, n: int) -> None:
        t0 = time.time()
        while time.time() - t0 < RUN_TIMEOUT_S:
            f = out / "evals.jsonl"
            if f.exists() and f.read_text().count("\n") >= n:
                return
            assert self.proc.poll() is None, self.stderr()
            time.sleep(0.05)
        self.kill()
        raise AssertionError(f"fewer than {n} evaluations after {RUN_TIMEOUT_S} s: {self.stderr()}")

    def finish(self) -> tuple[int, str]:
        try:
            self.proc.wait(timeout=RUN_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"the run hung: not done {RUN_TIMEOUT_S} s after the node was lost: "
                                 f"{self.stderr()}") from None
        self.err.close()
        return self.proc.returncode, self.stderr()

    def stderr(self) -> str:
        if not self.err.closed:
            self.err.flush()
        return self.err_path.read_text()

    def kill(self) -> None:
        import psutil

        children = psutil.Process(self.proc.pid).children(recursive=True)
        self.proc.kill()
        self.proc.wait()
        _, alive = psutil.wait_procs(children, timeout=20)
        for p in alive:  # only processes this test started
            p.kill()


def run_losing_a_node(cluster, tmp: Path, cfg: Path, out: Path, cpus: int, after: int) -> tuple[int, str]:
    """A search on the cluster plus a node of `cpus` CPUs, which is removed once `after` evaluations are
    logged; (exit code, stderr) when the run ends by itself."""
    node = cluster.add_node(num_cpus=cpus)
    try:
        run = Run(tmp, "--config", str(cfg), "--out", str(out), "--set", f"engine.address={cluster.address}")
        run.wait_for_evals(out, after)
        cluster.remove_node(node)
        node = None
        return run.finish()
    finally:
        if node is not None:
            cluster.remove_node(node)


def evals(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "evals.jsonl").read_text().splitlines()]


def events(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "workers.jsonl").read_text().splitlines()]


def summary(out: Path) -> dict:
    return json.loads((out / "summary.json").read_text())


def test_losing_a_node_gives_up_its_workers_and_the_run_finishes(cluster, tmp_path):
    cfg = write_config(tmp_path / "cfg.yaml", deterministic=True)
    out = tmp_path / "run"
    rc, err = run_losing_a_node(cluster, tmp_path, cfg, out, cpus=2, after=80)  # 4 workers of 1 CPU: 2 per node
    assert rc == 0, err
    assert [e["id"] for e in evals(out)] == list(range(800))  # each exactly once, in submission order
    s = summary(out)
    assert s["stop_reason"] == "max_evals" and s["evaluations"] == 800 and s["failed"] == 0
    assert s["workers"] == 4 and s["workers_live"] == 2 and s["workers_given_up"] == 2
    assert s["worker_replacements"] == 2 and "best" in s
    log = events(out)
    lost = {e["worker"] for e in log if e["event"] == "replaced"}
    assert len(lost) == 2 and {e["worker"] for e in log if e["event"] == "given_up"} == lost
    assert all("engine.worker_start_timeout_s" in e["reason"] for e in log if e["event"] == "given_up")
    assert err.count("given up") == 2 and "Traceback" not in err
