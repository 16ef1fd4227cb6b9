"""The worker pool in this process, without Ray: the same rules as RayPool (pool.WorkerPool), the
workers' calls run one at a time, in the order they were made, when the pool waits. Deterministic;
tests inject faults through the worker they build: a call that raises WorkerDeath stands for the
worker's process dying, one that raises WorkerHang never returns (a constructor that raises it: a
worker that never starts)."""
from __future__ import annotations

import itertools
import math
import time
from contextlib import AbstractContextManager, nullcontext
from typing import Callable

import numpy as np

from ..config import RunConfig
from .pool import CallFailed, WorkerLost, WorkerPool, first_line


class WorkerDeath(Exception):
    """Raised by an in-process worker: its process dies (RayPool: the actor is gone)."""


class WorkerHang(Exception):
    """Raised by an in-process worker: the call never returns (in its constructor: it never starts)."""


class _Worker:
    """One in-process worker: `obj` (built by make_worker), and its state: "up", "stuck" (a call hangs,
    or it never started: nothing more of it runs) or "dead" (died or killed)."""

    def __init__(self, make: Callable, args: tuple, kwargs: dict):
        self.obj = None
        self.state = "up"
        try:
            self.obj = make(*args, **kwargs)
        except WorkerHang:
            self.state = "stuck"
        except Exception:  # noqa: BLE001 - a constructor that raises: the worker process died
            self.state = "dead"


class _Call:
    """A call of a worker, run when the pool waits; `done` once it ran (`value` or `error`)."""

    def __init__(self, seq: int, worker: _Worker, fn: Callable):
        self.seq, self.worker, self.fn = seq, worker, fn
        self.done = False
        self.value = None
        self.error: Exception | None = None


def _run(worker: _Worker, fn: Callable):
    """fn() on a worker, its faults as the pool's: WorkerLost, CallFailed; WorkerHang passes through."""
    if worker.state == "dead":
        raise WorkerLost("the worker is gone")
    try:
        return fn()
    except WorkerDeath as err:
        worker.state = "dead"
        raise WorkerLost(f"the worker died: {first_line(err)}") from err
    except WorkerHang:
        worker.state = "stuck"
        raise
    except Exception as err:  # noqa: BLE001 - what the worker raised, as Ray reports it
        raise CallFailed(f"{type(err).__name__}: {first_line(err)}", err) from err


class InProcessPool(WorkerPool):
    """WorkerPool whose workers are objects of this process, made by `make_worker` (default
    FitnessWorker, called with FitnessWorker's arguments); a replacement is a new object."""

    def __init__(self, cfg: RunConfig, make_worker: Callable | None = None):
        super().__init__(cfg)
        if make_worker is None:
            from .worker import FitnessWorker

            make_worker = FitnessWorker
        self.make_worker = make_worker
        self.workers: list[_Worker | None] = [None] * self.size
        self._seq = itertools.count()

    def session(self) -> AbstractContextManager:
        return nullcontext()

    def _spawn(self, index: int) -> None:
        args, kwargs = self.worker_args(index)
        self.workers[index] = _Worker(self.make_worker, args, kwargs)

    def _kill(self, index: int) -> None:
        self.workers[index].state = "dead"

    def _call(self, index: int, fn: Callable) -> _Call:
        return _Call(next(self._seq), self.workers[index], fn)

    def _ready(self, index: int):
        w = self.workers[index]
        return self._call(index, lambda: w.obj.ready())

    def _evaluate(self, index: int, batch: np.ndarray, examples: list | None):
        w = self.workers[index]
        return self._call(index, lambda: w.obj.evaluate(batch, examples))

    def _wait(self, handles: list, timeout: float) -> list:
        done = []
        for call in sorted(handles, key=lambda c: c.seq):
            if not call.done and call.worker.state != "stuck":
                try:
                    call.value = _run(call.worker, call.fn)
                except WorkerHang:
                    continue
                except (WorkerLost, CallFailed) as err:
                    call.error = err
                call.done = True
            if call.done:
                done.append(call)
        if not done:
            time.sleep(min(timeout, 0.05) if math.isfinite(timeout) else 0.05)
        return done

    def _get(self, handle: _Call):
        if handle.error is not None:
            raise handle.error
        return handle.value

    def _sync(self, index: int, fn: Callable):
        w = self.workers[index]
        try:
            return _run(w, lambda: fn(w.obj))
        except WorkerHang:
            raise WorkerLost("the worker hangs") from None

    def holdout(self, index: int, x: np.ndarray) -> dict:
        return self._sync(index, lambda obj: obj.holdout(x))

    def save(self, index: int, x: np.ndarray, directory: str, info: dict) -> None:
        self._sync(index, lambda obj: obj.save(x, directory, info))

    def peak_rss_mb(self) -> list[float] | None:
        try:
            return [self._sync(w, lambda obj: obj.peak_rss_mb()) for w in self.live()]
        except (WorkerLost, CallFailed):
            return None
