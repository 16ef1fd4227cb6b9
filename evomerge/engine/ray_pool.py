"""The worker pool on Ray: each worker an actor, in the cluster the run joins or starts (cluster.py)."""
from __future__ import annotations

import math
import sys
from contextlib import AbstractContextManager

import numpy as np

from .pool import CallFailed, WorkerLost, WorkerPool, first_line


class RayPool(WorkerPool):
    """The workers as Ray actors (one CPU/GPU share each, max_concurrency=1, never restarted by Ray:
    the pool replaces them), in the cluster `session()` joins or starts."""

    def __init__(self, cfg):
        super().__init__(cfg)
        self.remote = None  # ray.remote(FitnessWorker) with the workers' resources (set by launch)
        self.actors: list = [None] * self.size

    def session(self) -> AbstractContextManager:
        from .cluster import RayCluster

        return RayCluster(self.cfg.engine)

    def launch(self, shared=None) -> None:
        import ray

        from .worker import FitnessWorker

        e = self.cfg.engine
        gpus = e.gpus_per_worker
        if gpus and not ray.cluster_resources().get("GPU"):
            print("warning: engine.gpus_per_worker is set but Ray sees no GPU: the workers run on CPU",
                  file=sys.stderr)
            gpus = 0
        self.remote = ray.remote(FitnessWorker).options(num_cpus=e.cpus_per_worker, num_gpus=gpus,
                                                        max_concurrency=1, max_restarts=0)
        super().launch(shared)

    def _spawn(self, index: int) -> None:
        args, kwargs = self.worker_args(index)
        self.actors[index] = self.remote.remote(*args, **kwargs)

    def _kill(self, index: int) -> None:
        import ray

        try:
            ray.kill(self.actors[index], no_restart=True)
        except Exception:  # noqa: BLE001 - already gone
            pass

    def _ready(self, index: int):
        return self.actors[index].ready.remote()

    def _evaluate(self, index: int, batch: np.ndarray, examples: list | None):
        return self.actors[index].evaluate.remote(batch, examples)

    def _wait(self, handles: list, timeout: float) -> list:
        import ray

        done, _ = ray.wait(handles, num_returns=1, timeout=None if math.isinf(timeout) else timeout)
        if done:
            more, _ = ray.wait(handles, num_returns=len(handles), timeout=0)
            done = more or done
        return done

    def _get(self, handle):
        import ray

        try:
            return ray.get(handle)
        except ray.exceptions.RayActorError as err:
            raise WorkerLost(first_line(err)) from err
        except ray.exceptions.RayTaskError as err:
            raise CallFailed(first_line(err), _innermost(err)) from err

    def holdout(self, index: int, x: np.ndarray) -> dict:
        return self._get(self.actors[index].holdout.remote(x))

    def save(self, index: int, x: np.ndarray, directory: str, info: dict) -> None:
        self._get(self.actors[index].save.remote(x, directory, info))

    def peak_rss_mb(self) -> list[float] | None:
        import ray

        try:
            return ray.get([self.actors[w].peak_rss_mb.remote() for w in self.live()])
        except ray.exceptions.RayError:
            return None


def _innermost(err: BaseException) -> BaseException:
    """What a worker raised: Ray's RayTaskError(UserError) is a UserError too, but its text is a
    traceback; the innermost cause is the one raised."""
    import ray

    cause = err
    while isinstance(cause, ray.exceptions.RayTaskError) and cause.cause is not None:
        cause = cause.cause
    return cause
