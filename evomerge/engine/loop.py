"""The search loop: ask the strategy -> route (cache, duplicates) -> dispatch batches to the worker pool
-> wait -> tell, until a stop rule holds; checkpoints and a journal make a resumed run exact."""
from __future__ import annotations

import time

import numpy as np

from evomerge.fitness import FITNESSES
from evomerge.populations import Strategy

from ..config import EngineConfig, RunConfig
from ..errors import UserError
from ..journal import unpack_scores
from ..progress import Progress
from ..rundir import RunDir
from ..spaces.base import SearchSpace
from ..subsets import ExamplePlan
from .jobs import RESULT_KEYS, Job, fingerprint, told
from .ledger import Ledger
from .pool import Finished, GivenUp, Lost, Started, WorkerPool
from .recorder import Recorder
from .summary import NO_BEST, summarize


def window(engine: EngineConfig) -> int:
    """Candidates a deterministic run keeps outstanding (and what strategies plan with)."""
    return engine.workers * engine.queue_depth * engine.batch_size


class Engine:
    """Asks the strategy, dispatches batches to the pool's workers, tells results, logs and checkpoints.

    Steady-state strategies are asked whenever a worker slot frees up, so no worker waits for a
    slower peer. With `engine.deterministic`, results are told in submission order, one ask-group at
    a time, and the strategy is asked only while fewer than workers x queue_depth x batch_size
    candidates are outstanding: the sequence of asks and tells, hence the whole run, depends only
    on the config and the seed, whatever the timing, worker failures or resumes.

    Holds the `ledger` (the search's books), the `recorder` (the run directory's logs), the search
    seconds of earlier sessions (`elapsed_before`) and of this one (since `session_start`), and why the
    run stops (`stop_reason`; `stop_requested` from outside the loop: a signal, the fitness, no workers).
    `shared` is the fitness's run-level resource, checkpointed with the engine's state; `example_counts` the
    fitness's (Fitness.example_counts, read by the caller; None: read here when `scoring` needs them).
    """

    def __init__(self, cfg: RunConfig, space: SearchSpace, strategy: Strategy, pool: WorkerPool, rundir: RunDir,
                 shared=None, progress: bool = True, example_counts: list[int] | None = None):
        self.cfg = cfg
        self.space = space
        self.strategy = strategy
        self.pool = pool
        self.rundir = rundir
        self.shared = shared
        self.show_progress = progress
        self.window = window(cfg.engine)
        fitness = FITNESSES[cfg.fitness.name][1]
        plan = combine = None
        if cfg.scoring.active:  # preflight has checked that the fitness can score subsets
            counts = example_counts if example_counts is not None else fitness.example_counts(cfg.fitness)
            plan = ExamplePlan(counts, cfg.scoring, cfg.seed)
            if fitness.from_scores(cfg.fitness, counts, None, np.zeros(plan.total)) is not None:
                def combine(examples, scores):
                    return fitness.from_scores(cfg.fitness, counts, examples, scores)
        keep = strategy.ranks_used if cfg.scoring.race is not None else None
        self.ledger = Ledger(cfg.engine, fitness.objectives(cfg.fitness), plan, keep,
                             cfg.scoring.verify_top if cfg.scoring.active else 0, combine)
        self.recorder = Recorder(rundir, cfg.budget.max_evals)
        self.stop_requested: str | None = None  # e.g. "interrupted", set from a signal handler
        self.stop_reason: str | None = None
        self.elapsed_before = 0.0
        self.sessions = 0
        self.session_start: float | None = None

    # state ------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {**self.ledger.state_dict(), "elapsed": self.elapsed(), "sessions": self.sessions,
                "stop_reason": self.stop_reason,
                "fitness_shared": None if self.shared is None else self.shared.state()}

    def load_state_dict(self, st: dict) -> None:
        self.ledger.load_state_dict(st)
        self.elapsed_before = st["elapsed"]
        self.sessions = st["sessions"]
        self.stop_reason = st["stop_reason"]

    def restore(self) -> int:
        """Load the run's checkpoint (read and checked by RunDir.open) and replay its journal; returns the
        number of replayed operations. Told evaluations missing from evals.jsonl (the driver died between
        journal and log) are logged."""
        ckpt = self.rundir.checkpoint
        self.strategy.load_state_dict(ckpt["strategy"])
        self.load_state_dict(ckpt["engine"])
        ops = self.recorder.resume(ckpt["journal_no"], self.rundir.logged_ids)
        last_t = 0.0  # search seconds of the last tell: a killed session's time since its checkpoint counts
        try:
            for op in ops:
                if op[0] == "ask":
                    _, n, first, keys = op
                    jobs = self._ask(n)
                    if not jobs or jobs[0].id != first or [fingerprint(j) for j in jobs] != keys:
                        raise UserError(f"--resume {self.rundir.path}: the strategy does not repeat its logged "
                                        f"candidates (ask at eval {first}); the run cannot be resumed exactly")
                    continue
                jobs = []
                for record, packed in op[1]:
                    job = self.ledger.jobs[record["id"]]
                    job.result = {k: record.get(k) for k in RESULT_KEYS}
                    job.result["failed"] = bool(record.get("failed"))
                    job.scores = unpack_scores(packed)
                    jobs.append(job)
                    last_t = max(last_t, record.get("t") or 0.0)
                self._tell(jobs)
        finally:
            self.recorder.replayed()
        self.elapsed_before = max(self.elapsed_before, last_t)  # time stamps keep growing across sessions
        self.stop_reason = None  # a resumed run decides again (the budget may have been raised)
        return len(ops)

    def _checkpoint(self) -> None:
        self.recorder.checkpoint(self.strategy.state_dict(), self.state_dict(), self.ledger.counts["told"])

    def elapsed(self) -> float:
        live = time.perf_counter() - self.session_start if self.session_start is not None else 0.0
        return self.elapsed_before + live

    # ask -> route -> dispatch -----------------------------------------------------------
    def _ask(self, n: int) -> list[Job]:
        candidates = self.strategy.ask(n)
        if not candidates:
            return []
        jobs = self.ledger.add_group(candidates, self.space)
        self.recorder.ask(n, jobs[0].id, [fingerprint(j) for j in jobs])
        if not self.recorder.replaying:
            for j in jobs:
                self.ledger.route(j)
        return jobs

    def _fill(self) -> None:
        e, budget, ledger = self.cfg.engine, self.cfg.budget, self.ledger
        if self.stop_reason is not None:
            ledger.flush_races()  # nothing more is asked: raced cohorts decide with what they have
        while self.stop_reason is None:
            if budget.max_evals is not None and ledger.next_id >= budget.max_evals:
                self.stop_reason = "max_evals"
            elif budget.max_seconds is not None and self.elapsed() >= budget.max_seconds:
                self.stop_reason = "max_seconds"
            elif self.strategy.done:
                self.stop_reason = "strategy_done"
            if self.stop_reason:
                ledger.flush_races()
                return
            if e.deterministic:
                room = self.window - len(ledger.jobs)
            else:
                room = self.pool.free_slots() * e.batch_size - len(ledger.queue)
            if room <= 0:
                return
            n = min(e.batch_size, room)
            if budget.max_evals is not None:
                n = min(n, budget.max_evals - ledger.next_id)
            if not self._ask(n):
                return

    def _dispatch(self) -> None:
        queue = self.ledger.queue
        while queue:
            w = self.pool.pick()
            if w is None:
                return
            jobs = [queue.popleft()]
            if not jobs[0].isolate:
                while queue and len(jobs) < self.cfg.engine.batch_size and not queue[0].isolate:
                    jobs.append(queue.popleft())
            self.pool.submit(w, jobs)

    # what the pool reports ----------------------------------------------------------------
    def _wait(self) -> None:
        for event in self.pool.wait(min(self.cfg.progress_every_s, 1.0)):
            if isinstance(event, Finished):
                stop = self.ledger.take(event.batch, event.out)
                if stop is not None:  # e.g. the API budget is spent: stop cleanly
                    self.stop_requested = self.stop_requested or "fitness_stop"
            elif isinstance(event, Lost):
                self._replace(event)
            elif isinstance(event, Started):
                self.recorder.event("started", self.elapsed(), **event.info)
            elif isinstance(event, GivenUp):
                self.recorder.event("given_up", self.elapsed(), worker=event.worker, reason=event.reason)
                if not event.live:  # none ready, none starting
                    self.stop_requested = self.stop_requested or "no_workers"
                    self.ledger.last_failure = f"worker {event.worker}: {event.reason}"

    def _replace(self, lost: Lost) -> None:
        """A worker died or hung: its candidates go back to the queue (see Ledger.requeue_lost) and a
        new worker takes its place, up to engine.max_worker_replacements in the run."""
        counts = self.ledger.counts
        if lost.timeout:
            counts["timeouts"] += 1
        self.ledger.requeue_lost(lost.batches, lost.reason)
        counts["worker_replacements"] += 1
        self.recorder.event("replaced", self.elapsed(), worker=lost.worker, reason=lost.reason)
        limit = self.cfg.engine.max_worker_replacements
        if counts["worker_replacements"] > limit:
            raise UserError(f"engine.max_worker_replacements: workers were replaced "
                            f"{counts['worker_replacements']} times (limit {limit}); last reason: {lost.reason}")
        self.pool.replace(lost.worker)

    # tell ------------------------------------------------------------------------------
    def _tell_ready(self) -> None:
        if not self.cfg.engine.deterministic:
            jobs = self.ledger.to_tell()
            if jobs:
                self._tell(jobs)
            return
        while self.stop_reason != "too_many_failures":
            jobs = self.ledger.to_tell()
            if not jobs:
                return
            self._tell(jobs)
            self._fill()  # asks happen at the same points of the sequence in every run

    def _tell(self, jobs: list[Job]) -> None:
        replaying = self.recorder.replaying
        now = None if replaying else round(self.elapsed(), 3)  # search seconds when told
        penalty = self.cfg.engine.failure_penalty
        pairs = [told(j, j.result.get("t") if replaying else now, penalty) for j in jobs]  # replayed: as first told
        records = [p[0] for p in pairs]
        self.recorder.tell(records, jobs)
        self.strategy.tell([p[1] for p in pairs])
        if self.ledger.new_draws and not replaying:  # the index sets the records name, before them
            self.rundir.log_subsets({d: self.ledger.draws[d] for d in self.ledger.new_draws})
            self.ledger.new_draws = []
        self.recorder.evals(records)
        self.ledger.close(jobs, records)
        if self.ledger.too_many_failures():
            self.stop_reason = "too_many_failures"
        if self.recorder.stats_due(self.ledger.counts["told"], now):
            self._stats()

    def _stats(self) -> None:
        self.recorder.stats(self.ledger.counts["told"], self.elapsed(), self.strategy)

    def verify(self) -> None:
        """Score the best estimates (results on part of the examples: subsets, racing) on every example
        before the best is reported or saved; the best of them may become the run's best. Their
        results are kept in the checkpoint (ledger.verified) and in summary.json, not told."""
        ledger = self.ledger
        jobs = ledger.to_verify()
        if not jobs:
            return
        ledger.queue.extendleft(reversed(jobs))
        while any(j.id not in ledger.verified for j in jobs) and not self.stop_requested:
            if not self.pool.live() and not self.pool.starting:
                break
            self._dispatch()
            self._wait()
        ledger.queue = type(ledger.queue)(j for j in ledger.queue if not j.verify)
        ledger.take_verified()
        self._checkpoint()

    # the loop ---------------------------------------------------------------------------
    def run(self) -> dict:
        """One session of the search, to a stop rule; returns the summary (summary.json)."""
        e, ledger, pool = self.cfg.engine, self.ledger, self.pool
        self.sessions += 1
        for info in pool.info:
            if info is not None:
                self.recorder.event("started", self.elapsed_before, **info)
        for w, reason in sorted(pool.given_up.items()):
            self.recorder.event("given_up", self.elapsed_before, worker=w, reason=reason)
        for job in sorted(ledger.jobs.values(), key=lambda j: j.id):  # resumed: results still owed
            if job.result is None:
                ledger.route(job)
            elif not e.deterministic:
                ledger.known.append(job)
        told_at_start = ledger.counts["told"]
        self.recorder.start_stats(told_at_start, self.elapsed_before)
        progress = Progress(self.cfg.budget.max_evals, self.cfg.progress_every_s, enabled=self.show_progress)
        self.session_start = time.perf_counter()
        cpu_start = time.process_time()
        self._checkpoint()
        while True:
            if self.stop_requested:
                self.stop_reason = self.stop_requested
                break
            self._tell_ready()
            if self.stop_reason == "too_many_failures":
                break
            self._fill()
            self._tell_ready()  # cache hits are known at once
            self._dispatch()
            if not ledger.jobs:
                if self.stop_reason is None:  # asked nothing and awaits nothing
                    self.stop_reason = "too_many_failures" if ledger.too_many_failures(1) else "strategy_exhausted"
                break
            if self.recorder.checkpoint_due(ledger.counts["told"], e.checkpoint_every_s, e.checkpoint_every_evals):
                self._checkpoint()
            if not ledger.queue and not pool.inflight and ledger.flush_races():
                continue  # raced members waited for a cohort that is not coming
            self._wait()
            rate = (ledger.counts["told"] - told_at_start) / max(time.perf_counter() - self.session_start, 1e-9)
            progress.update(ledger.counts["told"], ledger.shown_best()[1], rate, ledger.shown_best()[0])

        if ledger.estimates and self.stop_reason not in NO_BEST:
            self.verify()
        session_seconds = time.perf_counter() - self.session_start
        search_seconds = self.elapsed()
        driver_cpu = time.process_time() - cpu_start
        done_now = ledger.counts["told"] - told_at_start
        progress.close(ledger.counts["told"], ledger.shown_best()[1], done_now / max(session_seconds, 1e-9),
                       ledger.shown_best()[0])
        self._stats()  # the state at the end (unless the last line already shows it)
        self._checkpoint()
        self.session_start = None
        self.elapsed_before = search_seconds
        self.rundir.flush()
        summary = summarize(self, session_seconds, search_seconds, done_now, driver_cpu)
        if "best" in summary and self.shared is not None:
            self._checkpoint()  # what scoring the best's held-out split spent (e.g. API requests)
        return summary

