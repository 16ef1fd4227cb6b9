"""The workers of a run, behind one seam: `WorkerPool` holds the rules (start-up and its time limits,
a queue of batches per worker, evaluation timeouts, replacements, giving up on workers that never
start); `ray_pool.RayPool` runs the workers as Ray actors, `local.InProcessPool` in this process (tests)."""
from __future__ import annotations

import math
import sys
import time
from abc import ABC, abstractmethod
from collections import deque
from contextlib import AbstractContextManager
from dataclasses import dataclass

import numpy as np

from evomerge.populations import STRATEGIES

from ..config import RunConfig
from ..errors import UserError
from .jobs import Batch, Job


class WorkerLost(Exception):
    """A worker is gone (its process died, or it was killed) before the call returned."""


class CallFailed(Exception):
    """A call raised inside the worker; `cause` is what it raised (when known)."""

    def __init__(self, message: str, cause: BaseException | None = None):
        super().__init__(message)
        self.cause = cause


@dataclass
class Finished:
    """A batch came back: `out` as FitnessWorker.evaluate returns it."""

    batch: Batch
    out: dict


@dataclass
class Lost:
    """Worker `worker` died or hung (`timeout`); `batches` are what it had, the one it ran first. The
    pool has ended it; `WorkerPool.replace` starts its replacement."""

    worker: int
    reason: str
    batches: list[Batch]
    timeout: bool = False


@dataclass
class Started:
    """A replacement worker is ready."""

    worker: int
    info: dict


@dataclass
class GivenUp:
    """A replacement did not start in time: the run goes on without it (`live` workers left)."""

    worker: int
    reason: str
    live: int


class WorkerPool(ABC):
    """engine.workers workers, each scoring one batch at a time, up to engine.queue_depth queued.

    Per worker: `info` (what its ready() said, None until then), `ready` (takes batches), `slots` (free
    places in its queue), its `batches` in flight (the first is running) and `done_at` (when it last
    finished one). `given_up`: the workers that could not start this session, and why. `shared` is the
    fitness's run-level resource (FITNESSES[...].open_shared), handed to every worker.

    A subclass provides the transport: _spawn/_kill a worker, _ready/_evaluate calls returning handles,
    _wait for handles, _get a handle's result (raising WorkerLost / CallFailed / UserError), and the
    synchronous holdout/save/peak_rss_mb calls.
    """

    def __init__(self, cfg: RunConfig):
        self.cfg = cfg
        e = cfg.engine
        self.size = e.workers
        self.threads = e.threads_per_worker or max(1, int(e.cpus_per_worker))
        self.extra_metrics = STRATEGIES[cfg.strategy.name][1].extra_metrics(cfg.strategy)
        self.shared = None
        self.info: list[dict | None] = [None] * self.size
        self.ready = [False] * self.size
        self.slots = [0] * self.size
        self.batches: list[deque[Batch]] = [deque() for _ in range(self.size)]
        self.done_at = [0.0] * self.size
        self.given_up: dict[int, str] = {}
        self.inflight: dict = {}  # handle -> Batch
        self.starting: dict = {}  # handle of a replacement's ready() -> worker
        self.start_deadline: dict[int, float] = {}  # starting worker -> when it is given up
        self.launched = 0.0
        self.startup_seconds = 0.0

    # transport ------------------------------------------------------------------------------------
    @abstractmethod
    def session(self) -> AbstractContextManager:
        """The runtime the workers live in, for the run (e.g. a Ray cluster)."""

    @abstractmethod
    def _spawn(self, index: int) -> None:
        """Start worker `index` (FitnessWorker(index, ...worker_args)) in the background."""

    @abstractmethod
    def _kill(self, index: int) -> None:
        """End worker `index` (already gone: nothing)."""

    @abstractmethod
    def _ready(self, index: int):
        """A handle to worker `index`'s ready() (its info once started)."""

    @abstractmethod
    def _evaluate(self, index: int, batch: np.ndarray, examples: list | None):
        """A handle to worker `index`'s evaluate(batch, examples)."""

    @abstractmethod
    def _wait(self, handles: list, timeout: float) -> list:
        """The handles done, waiting up to `timeout` s for the first."""

    @abstractmethod
    def _get(self, handle):
        """The result of a done handle; WorkerLost, CallFailed or a UserError raised at start."""

    @abstractmethod
    def holdout(self, index: int, x: np.ndarray) -> dict:
        """Held-out metrics of point x on worker `index` (WorkerLost / CallFailed)."""

    @abstractmethod
    def save(self, index: int, x: np.ndarray, directory: str, info: dict) -> None:
        """Worker `index` writes the model of point x into directory (WorkerLost / CallFailed)."""

    @abstractmethod
    def peak_rss_mb(self) -> list[float] | None:
        """Peak memory of each ready worker, or None when one cannot say."""

    def worker_args(self, index: int) -> tuple[tuple, dict]:
        """The arguments of FitnessWorker for worker `index`."""
        c = self.cfg
        return ((index, c.space, c.fitness, c.seed, self.threads, self.extra_metrics),
                {"gpu_share": c.engine.gpu_share(), "shared": self.shared})

    # start-up ---------------------------------------------------------------------------------------
    def launch(self, shared=None) -> None:
        """Start the workers in the background (see wait_ready); `shared` reaches every one."""
        self.shared = shared
        self.launched = time.perf_counter()
        for i in range(self.size):
            self._spawn(i)

    def wait_ready(self) -> None:
        """Wait until the workers are ready. Once one is, a worker not ready within
        engine.worker_start_timeout_s more (or as long again as the first took, if longer) is given
        up, e.g. the cluster has no room for it: the run goes on with the others."""
        bound = self.cfg.engine.worker_start_timeout_s
        handles = {self._ready(i): i for i in range(self.size)}
        first = None  # seconds from launch to the first worker ready
        while handles:
            left = math.inf
            if bound is not None and first is not None:
                left = self.launched + first + max(bound, first) - time.perf_counter()
                if left <= 0:
                    break
            for h in self._wait(list(handles), left):
                w = handles.pop(h)
                try:
                    self.info[w] = self._get(h)
                except CallFailed as err:
                    raise (err.cause if isinstance(err.cause, UserError) else err.__cause__ or err) from None
                except WorkerLost as err:
                    raise err.__cause__ or err from None
                if first is None:
                    first = time.perf_counter() - self.launched
        now = time.perf_counter()
        self.startup_seconds = now - self.launched
        for w in range(self.size):
            if w not in handles.values():
                self.ready[w], self.slots[w], self.done_at[w] = True, self.cfg.engine.queue_depth, now
        if handles:
            reason = (f"not started within {max(bound, first):.3g} s of the first worker "
                      f"(engine.worker_start_timeout_s, or as long as the first took): {self._no_room()}")
            for w in sorted(handles.values()):
                self._kill(w)
                self.given_up[w] = reason
            print(f"warning: {len(handles)} of {self.size} workers {reason} - given up, the run goes on "
                  f"with {self.size - len(handles)}", file=sys.stderr)

    def _no_room(self) -> str:
        e = self.cfg.engine
        need = f"{e.cpus_per_worker:g} CPU" + (f" and {e.gpus_per_worker:g} GPU" if e.gpus_per_worker else "")
        return f"does the cluster have room for a worker ({need})?"

    # batches ------------------------------------------------------------------------------------------
    def free_slots(self) -> int:
        return sum(self.slots)

    def live(self) -> list[int]:
        """The ready workers (a starting one may never be: calls to it could wait forever)."""
        return [w for w in range(self.size) if self.ready[w]]

    def pick(self) -> int | None:
        """The worker with the most free slots, or None when every queue is full."""
        w = max(range(self.size), key=self.slots.__getitem__)
        return w if self.slots[w] > 0 else None

    def submit(self, w: int, jobs: list[Job]) -> Batch:
        batch = Batch(w, jobs, time.perf_counter())
        examples = [j.sending() for j in jobs]
        batch.handle = self._evaluate(w, np.stack([j.candidate.x for j in jobs]),
                                      None if all(e is None for e in examples) else examples)
        self.inflight[batch.handle] = batch
        self.batches[w].append(batch)
        self.slots[w] -= 1
        return batch

    def wait(self, timeout: float) -> list:
        """Wait up to `timeout` s for something to happen; what did: Finished, Lost, Started, GivenUp."""
        e = self.cfg.engine
        events: list = []
        now = time.perf_counter()
        for w, deadline in list(self.start_deadline.items()):
            if now >= deadline:
                events.append(self._give_up(w))
            else:
                timeout = min(timeout, deadline - now + 0.01)
        if e.eval_timeout_s:
            for w, batches in enumerate(self.batches):
                if batches and self.ready[w]:
                    b = batches[0]
                    left = max(b.sent, self.done_at[w]) + e.eval_timeout_s * len(b.jobs) - now
                    if left <= 0:
                        events.append(self._lose(w, f"timeout: no result after {e.eval_timeout_s * len(b.jobs):g} s",
                                                 timeout=True))
                        return events
                    timeout = min(timeout, left + 0.01)
        handles = list(self.inflight) + list(self.starting)
        if not handles:
            time.sleep(0.01)
            return events
        for h in self._wait(handles, timeout):
            if h in self.starting:
                events.extend(self._started(h))
                continue
            batch = self.inflight.pop(h, None)
            if batch is None:  # sent to a worker that has been replaced since
                continue
            try:
                out = self._get(h)
            except WorkerLost as err:
                events.append(self._lose(batch.worker, f"worker {batch.worker} died: {err}"))
                continue
            except CallFailed as err:
                out = {"errors": [f"worker error: {err}"] * len(batch.jobs), "seconds": 0.0}
            w = batch.worker
            self.batches[w].remove(batch)
            self.slots[w] += 1
            self.done_at[w] = time.perf_counter()
            events.append(Finished(batch, out))
        return events

    # replacements -------------------------------------------------------------------------------------
    def _started(self, handle) -> list:
        w = self.starting.pop(handle)
        self.start_deadline.pop(w, None)
        try:
            info = self._get(handle)
        except WorkerLost as err:
            return [self._lose(w, f"replacement worker died while starting: {err}")]
        except CallFailed as err:
            raise (err.cause if isinstance(err.cause, UserError) else err.__cause__ or err) from None
        self.ready[w], self.slots[w], self.done_at[w] = True, self.cfg.engine.queue_depth, time.perf_counter()
        self.info[w] = info
        return [Started(w, info)]

    def _lose(self, w: int, reason: str, timeout: bool = False) -> Lost:
        """Worker w died or hung: it is ended, its batches handed back (see replace)."""
        batches = list(self.batches[w])
        self.batches[w] = deque()
        for b in batches:
            self.inflight.pop(b.handle, None)
        self._drop_start(w)
        self._kill(w)
        self.ready[w], self.slots[w] = False, 0
        return Lost(w, reason, batches, timeout)

    def replace(self, w: int) -> None:
        """A new worker in w's place; nothing is sent to it before it is ready (it may never be: no
        room for it), and it is given up after engine.worker_start_timeout_s."""
        self._spawn(w)
        self._drop_start(w)
        bound = self.cfg.engine.worker_start_timeout_s
        self.starting[self._ready(w)] = w
        self.start_deadline[w] = math.inf if bound is None else time.perf_counter() + bound

    def _drop_start(self, w: int) -> None:
        for h in [h for h, v in self.starting.items() if v == w]:
            del self.starting[h]
        self.start_deadline.pop(w, None)

    def _give_up(self, w: int) -> GivenUp:
        """Replacement w did not start in time (e.g. its node is gone and no other has room)."""
        self._drop_start(w)
        self._kill(w)
        bound = self.cfg.engine.worker_start_timeout_s
        reason = f"not started within {bound:g} s (engine.worker_start_timeout_s): {self._no_room()}"
        self.given_up[w] = reason
        live = sum(self.ready) + len(self.starting)
        print(f"warning: replacement worker {w} {reason} - given up ({live} of {self.size} workers left)",
              file=sys.stderr)
        return GivenUp(w, reason, live)


def first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0][:300] if text else type(err).__name__
