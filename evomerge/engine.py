"""The Ray-distributed search loop: ask -> dispatch batches to worker actors -> ray.wait -> tell -> log."""
from __future__ import annotations

import logging
import os
import resource
import shutil
import sys
import tempfile
import time
from collections import deque

import numpy as np

from populations import Result, Strategy

from .config import EngineConfig, RunConfig
from .errors import UserError
from .progress import Progress
from .rundir import RunDir
from .space import SearchSpace
from .worker import FitnessWorker


class RayCluster:
    """A private local Ray instance (loopback, no usage stats, own temp dir) or an existing cluster."""

    def __init__(self, cfg: EngineConfig):
        self.cfg = cfg
        self.temp_dir: str | None = None
        self.owned = False

    def __enter__(self) -> "RayCluster":
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        os.environ.setdefault("RAY_DEDUP_LOGS", "0")
        import ray

        if ray.is_initialized():  # e.g. a notebook that set Ray up itself
            return self
        if self.cfg.address == "local":
            os.environ.setdefault("RAY_AUTH_MODE", "disabled")
            self.temp_dir = tempfile.mkdtemp(prefix="evomerge-ray-", dir="/tmp")
            need = int(np.ceil(self.cfg.workers * self.cfg.cpus_per_worker))
            ray.init(address="local", num_cpus=max(os.cpu_count() or 1, need), include_dashboard=False,
                     _temp_dir=self.temp_dir, _node_ip_address="127.0.0.1",
                     logging_level=logging.ERROR, configure_logging=True)
        else:
            try:
                ray.init(address=self.cfg.address, logging_level=logging.ERROR)
            except (ConnectionError, RuntimeError, ValueError) as e:
                msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                raise UserError(f"engine.address: cannot join Ray cluster {self.cfg.address!r}: {msg}") from None
        self.owned = True
        return self

    def __exit__(self, *exc) -> None:
        import ray

        if self.owned:
            ray.shutdown()
        if self.temp_dir:
            shutil.rmtree(self.temp_dir, ignore_errors=True)


class Engine:
    def __init__(self, cfg: RunConfig, space: SearchSpace, strategy: Strategy | None = None,
                 progress: bool = True):
        self.cfg = cfg
        self.space = space
        self.strategy = strategy
        self.show_progress = progress
        self.workers: list = []
        self.startup_seconds = 0.0

    def launch_workers(self) -> None:
        """Create the worker actors; they start in the background (see wait_workers)."""
        import ray

        self._launched = time.perf_counter()
        e = self.cfg.engine
        threads = e.threads_per_worker or max(1, int(e.cpus_per_worker))
        gpus = e.gpus_per_worker
        if gpus and not ray.cluster_resources().get("GPU"):
            print("warning: engine.gpus_per_worker is set but Ray sees no GPU: the workers run on CPU",
                  file=sys.stderr)
            gpus = 0
        remote = ray.remote(FitnessWorker).options(num_cpus=e.cpus_per_worker, num_gpus=gpus,
                                                   max_concurrency=1)
        self.workers = [remote.remote(i, self.cfg.space, self.cfg.fitness, self.cfg.seed, threads)
                        for i in range(e.workers)]

    def wait_workers(self) -> None:
        import ray

        try:
            self.worker_info = ray.get([w.ready.remote() for w in self.workers])
        except ray.exceptions.RayError as err:
            cause = err  # a UserError raised while a worker starts (e.g. a missing data file) stays one line
            while cause is not None and not isinstance(cause, UserError):
                cause = getattr(cause, "cause", None)
            if cause is not None:
                raise cause from None
            raise
        self.startup_seconds = time.perf_counter() - self._launched

    def run(self, rundir: RunDir) -> dict:
        import ray

        e, budget = self.cfg.engine, self.cfg.budget
        strategy = self.strategy
        max_evals = budget.max_evals
        progress = Progress(max_evals, self.cfg.progress_every_s, enabled=self.show_progress)
        free = deque(w for _ in range(e.queue_depth) for w in range(len(self.workers)))
        inflight: dict = {}
        submitted = done = 0
        busy_seconds = 0.0
        best = {"fitness": -np.inf, "id": None, "x": None, "metrics": {}}
        stop_reason = None
        start = time.perf_counter()
        cpu_start = time.process_time()

        while True:
            elapsed = time.perf_counter() - start
            while free and stop_reason is None:
                if max_evals is not None and submitted >= max_evals:
                    stop_reason = "max_evals"
                elif budget.max_seconds is not None and elapsed >= budget.max_seconds:
                    stop_reason = "max_seconds"
                elif strategy.done:
                    stop_reason = "strategy_done"
                if stop_reason:
                    break
                n = e.batch_size if max_evals is None else min(e.batch_size, max_evals - submitted)
                cands = strategy.ask(n)
                if not cands:
                    break  # the strategy waits for results in flight
                ids = range(submitted, submitted + len(cands))
                w = free.popleft()
                ref = self.workers[w].evaluate.remote(np.stack([c.x for c in cands]))
                inflight[ref] = (cands, ids)
                submitted += len(cands)
            if not inflight:
                if stop_reason is None:
                    stop_reason = "strategy_exhausted"  # asked nothing and awaits nothing
                break
            ready, _ = ray.wait(list(inflight), num_returns=1, timeout=self.cfg.progress_every_s)
            for ref in ready:
                cands, ids = inflight.pop(ref)
                ev, seconds, widx = ray.get(ref)
                free.append(widx)
                busy_seconds += seconds
                per_eval = seconds / len(cands)
                results, records = [], []
                for j, (c, eid) in enumerate(zip(cands, ids)):
                    fit = float(ev.fitness[j])
                    metrics = {k: float(v[j]) for k, v in ev.metrics.items()}
                    results.append(Result(c, fit, None if ev.scores is None else ev.scores[j], metrics))
                    record = {"id": eid, "step": c.step, "fitness": fit, "metrics": metrics,
                              "worker": widx, "seconds": round(per_eval, 6)}
                    recipe = self.space.recipe(c.x)
                    if recipe is not None:
                        record["recipe"] = recipe
                    records.append(record)
                    if fit > best["fitness"]:
                        best = {"fitness": fit, "id": eid, "x": c.x, "metrics": metrics}
                strategy.tell(results)
                rundir.log_evals(records)
                done += len(cands)
            wall = time.perf_counter() - start
            progress.update(done, best["fitness"], done / max(wall, 1e-9))

        search_seconds = time.perf_counter() - start
        driver_cpu = time.process_time() - cpu_start
        progress.close(done, best["fitness"], done / max(search_seconds, 1e-9))
        rundir.flush()

        summary = {
            "stop_reason": stop_reason,
            "evaluations": done,
            "search_seconds": round(search_seconds, 3),
            "startup_seconds": round(self.startup_seconds, 3),
            "evals_per_second": round(done / max(search_seconds, 1e-9), 2),
            "workers": len(self.workers),
            "worker_devices": [w["device"] for w in self.worker_info],
            "batch_size": e.batch_size,
            "worker_utilization": round(busy_seconds / max(len(self.workers) * search_seconds, 1e-9), 4),
            "driver_cpu_ms_per_eval": round(1e3 * driver_cpu / max(done, 1), 4),
            "engine_overhead_ms_per_eval": round(
                1e3 * max(0.0, search_seconds - busy_seconds / len(self.workers)) / max(done, 1), 4),
        }
        if best["x"] is not None:
            holdout = ray.get(self.workers[0].holdout.remote(best["x"]))
            summary["best"] = {"eval_id": best["id"], "fitness": best["fitness"], "metrics": best["metrics"],
                               "holdout": holdout}
            info = {"eval_id": best["id"], "fitness": best["fitness"], **best["metrics"], **holdout}
            ray.get(self.workers[0].save.remote(best["x"], str(rundir.best.resolve()), info))
        summary["strategy"] = strategy.summary()
        summary["driver_peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
        summary["worker_peak_rss_mb"] = [round(m, 1) for m in ray.get([w.peak_rss_mb.remote() for w in self.workers])]
        return summary
