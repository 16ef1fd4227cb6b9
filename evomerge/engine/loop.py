"""The Ray-distributed search loop: ask -> dispatch batches to worker actors -> ray.wait -> tell -> log.

Also: checkpoints and a journal (resume), worker replacement and retries (failures), an evaluation
cache (duplicates), and a deterministic mode (told in submission order).
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import resource
import shutil
import sys
import time
from collections import OrderedDict, deque
from dataclasses import dataclass, field

import numpy as np

from evomerge.populations import STRATEGIES, Candidate, Result, Strategy

from ..config import RunConfig
from ..errors import UserError
from ..journal import pack_scores, unpack_scores
from ..pareto import ParetoFront
from ..progress import Progress
from ..rundir import RunDir
from ..spaces.base import SearchSpace
from .worker import FitnessWorker


@dataclass(eq=False)
class Job:
    """One candidate from ask to tell. `result` is set once its evaluation (or a cached one) is known."""

    id: int
    group: int
    cand: Candidate
    key: str | None  # identity of a recipe (None in spaces whose vector is the model)
    recipe: dict | None
    attempts: int = 0  # failed attempts so far
    isolate: bool = False  # dispatched alone (after a failure inside a batch)
    result: dict | None = None  # fitness, metrics, failed, error, worker, seconds, cached_from, TIMING_KEYS
    scores: np.ndarray | None = None
    followers: list = field(default_factory=list)  # duplicates waiting for this evaluation


@dataclass(eq=False)
class Task:
    """One call to a worker: a batch of jobs."""

    worker: int
    jobs: list[Job]
    sent: float
    ref: object = None


def candidate_key(recipe: dict | None) -> str | None:
    """Identity of a candidate: a hash of its recipe. Spaces without recipes (the vector is the
    model, e.g. digits, where an evaluation costs about as much as hashing the vector) have none:
    their candidates are neither deduplicated nor cached."""
    if recipe is None:
        return None
    return hashlib.sha256(json.dumps(recipe, sort_keys=True, separators=(",", ":")).encode()).hexdigest()[:24]


def fingerprint(job: Job):
    """What the journal keeps of an asked candidate, to check that a replayed ask repeats it."""
    return job.key if job.key is not None else (float(np.sum(job.cand.x, dtype=np.float64)), job.cand.step)


MIN_FAILURES_TO_STOP = 10
# Seconds per candidate measured in the worker (see FitnessWorker.evaluate), on the records of candidates
# evaluated (not cached, not failed): merge_s materializing the model, score_s the fitness, transfer_s the
# host-to-device copies of streamed merge inputs (overlapping the merge: part of merge_s, not added to it).
TIMING_KEYS = ("merge_s", "transfer_s", "score_s")
STATS_LINES = 500  # strategy.jsonl: about this many lines over max_evals
STATS_EVERY_S = 10.0  # ... or one every this many seconds of search (no max_evals)


class Engine:
    """Asks the strategy, dispatches batches to worker actors, tells results, logs and checkpoints.

    Steady-state strategies are asked whenever a worker slot frees up, so no worker waits for a
    slower peer. With `engine.deterministic`, results are told in submission order, one ask-group at
    a time, and the strategy is asked only while fewer than workers x queue_depth x batch_size
    candidates are outstanding: the sequence of asks and tells, hence the whole run, depends only
    on the config and the seed, whatever the timing, worker failures or resumes.
    """

    def __init__(self, cfg: RunConfig, space: SearchSpace, strategy: Strategy | None = None,
                 progress: bool = True):
        self.cfg = cfg
        self.space = space
        self.strategy = strategy
        self.show_progress = progress
        self.workers: list = []
        self.worker_info: list[dict] = []
        self.startup_seconds = 0.0
        self.stop_requested: str | None = None  # set from a signal handler: "interrupted"
        e = cfg.engine
        self.window = e.workers * e.queue_depth * e.batch_size
        # the search state (checkpointed)
        self.next_id = 0
        self.next_group = 0
        self.groups: OrderedDict[int, list[Job]] = OrderedDict()  # asked, not yet told, by ask
        self.jobs: dict[int, Job] = {}
        self.counts = {"told": 0, "failed": 0, "cached": 0, "retried": 0, "worker_replacements": 0,
                       "timeouts": 0}
        self.busy_seconds = 0.0
        self.timing = {k: [0.0, 0] for k in TIMING_KEYS}  # key -> [sum, count] over the told records carrying it
        self.elapsed_before = 0.0  # search seconds of earlier sessions of this run
        self.sessions = 0
        self.best = {"fitness": -np.inf, "id": None, "x": None, "metrics": {}}
        self.cache: OrderedDict[str, tuple[dict, np.ndarray | None]] = OrderedDict()
        from evomerge.fitness import FITNESSES

        objectives = FITNESSES[cfg.fitness.name][1].objectives(cfg.fitness)
        self.front = ParetoFront(objectives) if len(objectives) > 1 else None
        self.stop_reason: str | None = None
        self.last_failure: str | None = None
        # live only
        self.queue: deque[Job] = deque()
        self.leaders: dict[str, Job] = {}
        self.ready: list[Job] = []  # known, not yet told (steady-state mode)
        self.inflight: dict = {}
        self.aux: dict = {}  # ready() refs of replacements still starting -> (worker, generation)
        self.starting: dict[int, tuple] = {}  # worker -> (its ready() ref, when it is given up)
        self.given_up: dict[int, str] = {}  # workers that could not start (this session) -> why
        self.logged: set[int] = set()  # ids already in evals.jsonl (while resuming)
        self.replaying = False
        self.journal = None  # the open journal (RunDir.open_journal)
        self.journal_no = 0
        self.stats_every: int | None = None  # strategy.jsonl: a line every this many tells, else every
        self.stats_mark = 0                  # STATS_EVERY_S of search; told // stats_every at the last line
        self.stats_next_t = 0.0
        self.stats_told = -1  # told at the last line
        self.stats_failed = False

    # workers ----------------------------------------------------------------------------
    def launch_workers(self, shared_state=None) -> None:
        """Create the worker actors; they start in the background (see wait_workers).

        First, what the fitness shares between its workers (e.g. an API budget actor), from
        `shared_state` (what a resumed run's checkpoint holds), so every worker finds it."""
        import ray

        from evomerge.fitness import FITNESSES

        opener = getattr(FITNESSES[self.cfg.fitness.name][1], "open_shared", None)
        self.shared = opener(self.cfg.fitness, shared_state) if opener is not None else None

        self._launched = time.perf_counter()
        e = self.cfg.engine
        threads = e.threads_per_worker or max(1, int(e.cpus_per_worker))
        gpus = e.gpus_per_worker
        if gpus and not ray.cluster_resources().get("GPU"):
            print("warning: engine.gpus_per_worker is set but Ray sees no GPU: the workers run on CPU",
                  file=sys.stderr)
            gpus = 0
        self._remote = ray.remote(FitnessWorker).options(num_cpus=e.cpus_per_worker, num_gpus=gpus,
                                                         max_concurrency=1, max_restarts=0)
        self._threads = threads
        self.workers = [self._new_worker(i) for i in range(e.workers)]
        self.gen = [0] * e.workers

    def _new_worker(self, i: int):
        extras = STRATEGIES[self.cfg.strategy.name][1].worker_extras(self.cfg.strategy)
        return self._remote.remote(i, self.cfg.space, self.cfg.fitness, self.cfg.seed, self._threads, extras,
                                   gpu_share=self.cfg.engine.gpu_share())

    def wait_workers(self) -> None:
        """Wait until the workers are ready. Once one is, a worker not ready within
        engine.worker_start_timeout_s more (or as long again as the first took, if longer) is given
        up, e.g. the cluster has no room for it: the run goes on with the others."""
        import ray

        bound = self.cfg.engine.worker_start_timeout_s
        refs = {w.ready.remote(): i for i, w in enumerate(self.workers)}
        self.worker_info = [None] * len(self.workers)
        first = None  # seconds from launch to the first worker ready
        while refs:
            left = None
            if bound is not None and first is not None:
                left = self._launched + first + max(bound, first) - time.perf_counter()
                if left <= 0:
                    break
            done, _ = ray.wait(list(refs), num_returns=1, timeout=left)
            for ref in done:
                w = refs.pop(ref)
                try:
                    self.worker_info[w] = ray.get(ref)
                except ray.exceptions.RayError as err:
                    raise _user_cause(err) from None
                if first is None:
                    first = time.perf_counter() - self._launched
        self.startup_seconds = time.perf_counter() - self._launched
        if refs:
            reason = (f"not started within {max(bound, first):.3g} s of the first worker "
                      f"(engine.worker_start_timeout_s, or as long as the first took): {self._no_room()}")
            for w in sorted(refs.values()):
                self._kill(w)
                self.given_up[w] = reason
            print(f"warning: {len(refs)} of {len(self.workers)} workers {reason} - given up, the run goes on "
                  f"with {len(self.workers) - len(refs)}", file=sys.stderr)

    def _no_room(self) -> str:
        e = self.cfg.engine
        need = f"{e.cpus_per_worker:g} CPU" + (f" and {e.gpus_per_worker:g} GPU" if e.gpus_per_worker else "")
        return f"does the cluster have room for a worker ({need})?"

    def _kill(self, w: int) -> None:
        import ray

        try:
            ray.kill(self.workers[w], no_restart=True)
        except Exception:  # noqa: BLE001 - already gone
            pass

    def _give_up(self, w: int) -> None:
        """Replacement w did not start in time (e.g. its node is gone and no other has room): the
        run goes on without it; with no worker left (none ready, none starting), it stops."""
        ref, _ = self.starting.pop(w)
        self.aux.pop(ref, None)
        self._kill(w)
        self.gen[w] += 1
        bound = self.cfg.engine.worker_start_timeout_s
        reason = f"not started within {bound:g} s (engine.worker_start_timeout_s): {self._no_room()}"
        self.given_up[w] = reason
        self.rundir.log_event({"event": "given_up", "worker": w, "reason": reason, "t": round(self.elapsed(), 3)})
        live = sum(self.worker_ready) + len(self.starting)
        print(f"warning: replacement worker {w} {reason} - given up ({live} of {len(self.workers)} workers left)",
              file=sys.stderr)
        if not live:
            self.stop_requested = self.stop_requested or "no_workers"
            self.last_failure = f"worker {w}: {reason}"

    def _replace_worker(self, w: int, reason: str) -> None:
        """Worker w died or hung: a new actor takes its place once ready; its batches go back to the
        queue, for any ready worker (see _give_up for a replacement that does not start).

        The candidates of the batch it was running are re-sent one per call, so that the one that
        killed it is found: a candidate alone in its call counts a failed attempt. Batches queued
        behind it are re-sent as they were.
        """

        tasks = self.worker_tasks[w]
        self.worker_tasks[w] = deque()
        back: list[Job] = []
        for i, t in enumerate(tasks):
            self.inflight.pop(t.ref, None)
            for job in t.jobs:
                if i == 0 and len(t.jobs) == 1:
                    self._retry_or_fail(job, reason)
                else:
                    job.isolate = job.isolate or i == 0
                    back.append(job)
        self.queue.extendleft(reversed(back))
        self._kill(w)
        self.counts["worker_replacements"] += 1
        self.rundir.log_event({"event": "replaced", "worker": w, "reason": reason, "t": round(self.elapsed(), 3)})
        limit = self.cfg.engine.max_worker_replacements
        if self.counts["worker_replacements"] > limit:
            raise UserError(f"engine.max_worker_replacements: workers were replaced "
                            f"{self.counts['worker_replacements']} times (limit {limit}); last reason: {reason}")
        self.workers[w] = self._new_worker(w)
        self.gen[w] += 1
        self.slots[w] = 0  # nothing is sent to it before it is ready: it may never be (no room for it)
        self.worker_ready[w] = False
        old = self.starting.pop(w, None)
        if old is not None:
            self.aux.pop(old[0], None)
        ref = self.workers[w].ready.remote()
        self.aux[ref] = (w, self.gen[w])
        bound = self.cfg.engine.worker_start_timeout_s
        self.starting[w] = (ref, math.inf if bound is None else time.perf_counter() + bound)

    # state ------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        jobs = [{"id": j.id, "group": j.group, "x": j.cand.x, "step": j.cand.step, "tag": j.cand.tag,
                 "key": j.key, "recipe": j.recipe, "attempts": j.attempts, "result": j.result,
                 "scores": pack_scores(j.scores)} for g in self.groups.values() for j in g]
        return {"next_id": self.next_id, "next_group": self.next_group, "jobs": jobs,
                "counts": dict(self.counts), "busy_seconds": self.busy_seconds,
                "timing": {k: list(v) for k, v in self.timing.items()},
                "elapsed": self.elapsed(), "sessions": self.sessions, "best": dict(self.best),
                "cache": [(k, r, pack_scores(s)) for k, (r, s) in self.cache.items()],
                "stop_reason": self.stop_reason, "last_failure": self.last_failure,
                "front": None if self.front is None else self.front.members,
                "fitness_shared": None if getattr(self, "shared", None) is None else self.shared.state()}

    def load_state_dict(self, st: dict) -> None:
        self.next_id, self.next_group = st["next_id"], st["next_group"]
        self.groups.clear()
        self.jobs.clear()
        for d in st["jobs"]:
            job = Job(d["id"], d["group"], Candidate(d["x"], d["step"], d["tag"]), d["key"], d["recipe"],
                      attempts=d["attempts"], result=d["result"], scores=unpack_scores(d["scores"]))
            self.groups.setdefault(job.group, []).append(job)
            self.jobs[job.id] = job
        self.counts.update(st["counts"])
        self.busy_seconds = st["busy_seconds"]
        for k, v in (st.get("timing") or {}).items():  # checkpoints of older versions have none
            if k in self.timing:
                self.timing[k] = list(v)
        self.elapsed_before = st["elapsed"]
        self.sessions = st["sessions"]
        self.best = st["best"]
        self.cache = OrderedDict((k, (r, unpack_scores(s))) for k, r, s in st["cache"])
        self.stop_reason = st["stop_reason"]
        self.last_failure = st["last_failure"]
        if self.front is not None and st.get("front") is not None:
            self.front.members = st["front"]

    def restore(self, rundir: RunDir) -> int:
        """Load the run's checkpoint (read and checked by RunDir.open) and replay its journal; returns the
        number of replayed operations.

        Told evaluations missing from evals.jsonl (the driver died between journal and log) are logged.
        """
        self.rundir = rundir
        run = rundir.path
        ckpt = rundir.checkpoint
        self.strategy.load_state_dict(ckpt["strategy"])
        self.load_state_dict(ckpt["engine"])
        self.journal_no = ckpt["journal_no"]
        self.logged = rundir.logged_ids
        ops = rundir.read_journal(self.journal_no)
        self.replaying = True
        last_t = 0.0  # search seconds of the last tell: a killed session's time since its checkpoint counts
        try:
            for op in ops:
                if op[0] == "ask":
                    _, n, first, keys = op
                    got = self._ask(n)
                    if self.next_id - got != first or [fingerprint(j) for j in self.groups[self.next_group - 1]] != keys:
                        raise UserError(f"--resume {run}: the strategy does not repeat its logged candidates "
                                        f"(ask at eval {first}); the run cannot be resumed exactly")
                else:
                    jobs = []
                    for record, packed in op[1]:
                        job = self.jobs[record["id"]]
                        job.result = {k: record.get(k) for k in _RESULT_KEYS}
                        job.result["failed"] = bool(record.get("failed"))
                        job.scores = unpack_scores(packed)
                        jobs.append(job)
                        last_t = max(last_t, record.get("t") or 0.0)
                    self._tell(jobs)
        finally:
            self.replaying = False
        self.elapsed_before = max(self.elapsed_before, last_t)  # time stamps keep growing across sessions
        self.logged = set()
        self.stop_reason = None  # a resumed run decides again (the budget may have been raised)
        return len(ops)

    def _checkpoint(self) -> None:
        old = self.journal
        self.journal_no += 1
        self.rundir.write_checkpoint({"version": 1, "journal_no": self.journal_no,
                                      "strategy": self.strategy.state_dict(), "engine": self.state_dict()})
        self.journal = self.rundir.open_journal(self.journal_no)
        if old is not None:
            old.close()
            old.path.unlink(missing_ok=True)
        self.last_checkpoint = (time.perf_counter(), self.counts["told"])

    def elapsed(self) -> float:
        live = time.perf_counter() - self.session_start if getattr(self, "session_start", None) else 0.0
        return self.elapsed_before + live

    # ask -> route -> dispatch -----------------------------------------------------------
    def _ask(self, n: int) -> int:
        cands = self.strategy.ask(n)
        if not cands:
            return 0
        g, first = self.next_group, self.next_id
        jobs = []
        for i, c in enumerate(cands):
            recipe = self.space.recipe(c.x)
            jobs.append(Job(first + i, g, c, candidate_key(recipe), recipe))
        self.next_group += 1
        self.next_id += len(jobs)
        self.groups[g] = jobs
        for j in jobs:
            self.jobs[j.id] = j
        if not self.replaying:
            self.journal.append(("ask", n, first, [fingerprint(j) for j in jobs]))
            for j in jobs:
                self._route(j)
        return len(jobs)

    def _route(self, job: Job) -> None:
        """Serve a duplicate from the cache or from the same candidate in flight, else queue it."""
        if job.key is None:
            self.queue.append(job)
            return
        hit = self.cache.get(job.key)
        if hit is not None:
            self.cache.move_to_end(job.key)
            record, scores = hit
            self._resolve(job, {**record, "cached_from": record["id"], "worker": None, "seconds": 0.0,
                                **dict.fromkeys(TIMING_KEYS)}, scores)
        elif job.key in self.leaders:
            self.leaders[job.key].followers.append(job)
        else:
            self.leaders[job.key] = job
            self.queue.append(job)

    def _fill(self) -> None:
        e, budget = self.cfg.engine, self.cfg.budget
        while self.stop_reason is None:
            if budget.max_evals is not None and self.next_id >= budget.max_evals:
                self.stop_reason = "max_evals"
            elif budget.max_seconds is not None and self.elapsed() >= budget.max_seconds:
                self.stop_reason = "max_seconds"
            elif self.strategy.done:
                self.stop_reason = "strategy_done"
            if self.stop_reason:
                return
            if e.deterministic:
                room = self.window - len(self.jobs)
            else:
                room = sum(self.slots) * e.batch_size - len(self.queue)
            if room <= 0:
                return
            n = min(e.batch_size, room)
            if budget.max_evals is not None:
                n = min(n, budget.max_evals - self.next_id)
            if self._ask(n) == 0:
                return

    def _dispatch(self) -> None:
        e = self.cfg.engine
        while self.queue:
            w = max(range(len(self.workers)), key=self.slots.__getitem__)
            if self.slots[w] <= 0:
                return
            jobs = [self.queue.popleft()]
            if not jobs[0].isolate:
                while self.queue and len(jobs) < e.batch_size and not self.queue[0].isolate:
                    jobs.append(self.queue.popleft())
            task = Task(w, jobs, time.perf_counter())
            task.ref = self.workers[w].evaluate.remote(np.stack([j.cand.x for j in jobs]))
            self.inflight[task.ref] = task
            self.worker_tasks[w].append(task)
            self.slots[w] -= 1

    # results ----------------------------------------------------------------------------
    def _resolve(self, job: Job, result: dict, scores) -> None:
        job.result, job.scores = result, scores
        if self.leaders.get(job.key) is job:
            del self.leaders[job.key]
        if not self.cfg.engine.deterministic:
            self.ready.append(job)
        for f in job.followers:
            self._resolve(f, {**result, "cached_from": job.id, "worker": None, "seconds": 0.0,
                              **dict.fromkeys(TIMING_KEYS)}, scores)
        job.followers = []
        if result.get("cached_from") is None and self.cfg.engine.cache_size and job.key is not None:
            self.cache[job.key] = ({**result, "id": job.id}, scores)
            while len(self.cache) > self.cfg.engine.cache_size:
                self.cache.popitem(last=False)

    def _retry_or_fail(self, job: Job, reason: str) -> None:
        job.attempts += 1
        if job.attempts > self.cfg.engine.max_retries:
            self._resolve(job, {"fitness": None, "metrics": {}, "failed": True, "error": reason,
                                "worker": None, "seconds": None, "cached_from": None}, None)
        else:
            self.counts["retried"] += 1
            job.isolate = True
            self.queue.appendleft(job)

    def _on_task(self, task: Task, out: dict) -> None:
        w = task.worker
        self.worker_tasks[w].remove(task)
        self.slots[w] += 1
        self.worker_done_at[w] = time.perf_counter()
        self.busy_seconds += out["seconds"]
        per = out["seconds"] / len(task.jobs)
        timing = out.get("timing") or [None] * len(task.jobs)
        for j, job in enumerate(task.jobs):
            err = out["errors"][j]
            if err is not None and err.startswith("StopRun:"):  # e.g. the API budget is spent: stop cleanly,
                self.queue.appendleft(job)                       # the candidate stays asked, not told
                self.stop_requested = self.stop_requested or "fitness_stop"
                self.last_failure = err
                continue
            if err is not None:
                self._retry_or_fail(job, err)
                continue
            fit = float(out["fitness"][j])
            metrics = {k: float(v[j]) for k, v in out["metrics"].items()}
            scores = None if out["scores"] is None else out["scores"][j]
            result = {"fitness": fit, "metrics": metrics, "failed": False, "error": None, "worker": w,
                      "seconds": round(per, 6), "cached_from": None}
            for k, v in (timing[j] or {}).items():
                if k in TIMING_KEYS and v is not None and math.isfinite(v):
                    result[k] = round(max(float(v), 0.0), 6)
            if not np.isfinite(fit):
                result.update(fitness=None, failed=True, error=f"fitness is {fit}")
            self._resolve(job, result, scores)

    def _tell_ready(self) -> None:
        if self.cfg.engine.deterministic:
            while self.groups and self.stop_reason != "too_many_failures":
                jobs = next(iter(self.groups.values()))
                if any(j.result is None for j in jobs):
                    return
                self._tell(jobs)
                self._fill()  # asks happen at the same points of the sequence in every run
        elif self.ready:
            jobs, self.ready = sorted(self.ready, key=lambda j: j.id), []
            self._tell(jobs)

    def _tell(self, jobs: list[Job]) -> None:
        jobs = list(jobs)  # may be a group itself, which shrinks below
        penalty = self.cfg.engine.failure_penalty
        now = None if self.replaying else round(self.elapsed(), 3)  # search seconds when told
        records, results = [], []
        for job in jobs:
            r = job.result
            record = {"id": job.id, "step": job.cand.step}
            if job.key is not None:
                record["key"] = job.key
            if r["failed"]:
                record.update(failed=True, error=r["error"], fitness=None)
            else:
                record.update(fitness=r["fitness"], metrics=r["metrics"])
            record.update(worker=r["worker"], seconds=r["seconds"])
            t = r.get("t") if self.replaying else now  # replayed: the time logged when first told
            if t is not None:
                record["t"] = t
            if not r["failed"] and r.get("cached_from") is None:  # a cached or failed record claims no time
                for k in TIMING_KEYS:
                    if r.get(k) is not None:
                        record[k] = r[k]
            if job.attempts:
                record["attempts"] = job.attempts + (0 if r["failed"] else 1)
            if r.get("cached_from") is not None:
                record["cached_from"] = r["cached_from"]
            if job.recipe is not None:
                record["recipe"] = job.recipe
            records.append(record)
            told = (penalty if penalty is not None else -np.inf) if r["failed"] else r["fitness"]
            results.append(Result(job.cand, told, job.scores, r["metrics"] if not r["failed"] else {},
                                  failed=r["failed"]))
        if not self.replaying:
            self.journal.append(("tell", [(rec, pack_scores(j.scores)) for rec, j in zip(records, jobs)]))
        self.strategy.tell(results)
        new = [rec for rec in records if rec["id"] not in self.logged]
        if new:
            self.rundir.log_evals(new)
        for job, rec in zip(jobs, records):
            group = self.groups.get(job.group)
            if group is not None:
                group.remove(job)
                if not group:
                    del self.groups[job.group]
            del self.jobs[job.id]
            self.counts["told"] += 1
            if rec.get("failed"):
                self.counts["failed"] += 1
                self.last_failure = f"eval {job.id}: {rec['error']}"
            else:
                if rec.get("cached_from") is not None:
                    self.counts["cached"] += 1
                elif self.front is not None:
                    self.front.add(job.id, rec["fitness"], rec["metrics"])
                for k in TIMING_KEYS:
                    if k in rec:
                        self.timing[k][0] += rec[k]
                        self.timing[k][1] += 1
                if rec["fitness"] > self.best["fitness"]:
                    self.best = {"fitness": rec["fitness"], "id": job.id, "x": job.cand.x,
                                 "metrics": rec["metrics"]}
        c = self.counts
        if c["failed"] >= MIN_FAILURES_TO_STOP and c["failed"] > self.cfg.engine.max_failure_fraction * c["told"]:
            self.stop_reason = "too_many_failures"
        if not self.replaying:
            if self.stats_every:
                if c["told"] // self.stats_every != self.stats_mark:
                    self._log_stats()
            elif now is not None and now >= self.stats_next_t:
                self._log_stats()

    def _log_stats(self) -> None:
        """A line of strategy.jsonl: tells so far, search seconds, the strategy's statistics."""
        told, t = self.counts["told"], self.elapsed()
        if self.stats_every:
            self.stats_mark = told // self.stats_every
        self.stats_next_t = (math.floor(t / STATS_EVERY_S) + 1) * STATS_EVERY_S
        if told == self.stats_told:
            return
        self.stats_told = told
        entry = {"evals": told, "t": round(t, 3)}
        try:
            stats = self.strategy.stats()
        except Exception as err:  # noqa: BLE001 - statistics are never worth ending a long run
            if not self.stats_failed:
                print(f"warning: strategy statistics failed ({type(err).__name__}: {err}); "
                      "strategy.jsonl logs only evals and t", file=sys.stderr)
            self.stats_failed, stats = True, {}
        for k, v in stats.items():
            v = float(v)
            if math.isfinite(v):
                entry[k] = v
        self.rundir.log_stats(entry)

    # the loop ---------------------------------------------------------------------------
    def _wait(self) -> None:
        import ray

        timeout = min(self.cfg.progress_every_s, 1.0)
        e = self.cfg.engine
        now = time.perf_counter()
        for w, (_, deadline) in list(self.starting.items()):
            if now >= deadline:
                self._give_up(w)
            else:
                timeout = min(timeout, deadline - now + 0.01)
        if e.eval_timeout_s:
            for w, tasks in enumerate(self.worker_tasks):
                if tasks and self.worker_ready[w]:
                    t = tasks[0]
                    left = max(t.sent, self.worker_done_at[w]) + e.eval_timeout_s * len(t.jobs) - now
                    if left <= 0:
                        self.counts["timeouts"] += 1
                        self._replace_worker(w, f"timeout: no result after {e.eval_timeout_s * len(t.jobs):g} s")
                        return
                    timeout = min(timeout, left + 0.01)
        refs = list(self.inflight) + list(self.aux)
        if not refs:
            time.sleep(0.01)
            return
        ready, _ = ray.wait(refs, num_returns=1, timeout=timeout)
        if ready:
            more, _ = ray.wait(refs, num_returns=len(refs), timeout=0)
            ready = more or ready
        for ref in ready:
            if ref in self.aux:
                w, gen = self.aux.pop(ref)
                try:
                    info = ray.get(ref)
                except ray.exceptions.RayActorError as err:
                    if gen == self.gen[w]:
                        self._replace_worker(w, f"replacement worker died while starting: {_first_line(err)}")
                    continue
                except ray.exceptions.RayError as err:
                    raise _user_cause(err) from None
                if gen == self.gen[w]:
                    self.starting.pop(w, None)
                    self.worker_ready[w] = True
                    self.slots[w] = e.queue_depth
                    self.worker_done_at[w] = time.perf_counter()
                    self.worker_info[w] = info
                    self.rundir.log_event({"event": "started", **info, "t": round(self.elapsed(), 3)})
                continue
            task = self.inflight.pop(ref, None)
            if task is None:  # sent to a worker that has been replaced since
                continue
            try:
                out = ray.get(ref)
            except ray.exceptions.RayActorError as err:
                self._replace_worker(task.worker, f"worker {task.worker} died: {_first_line(err)}")
                continue
            except ray.exceptions.RayTaskError as err:
                out = {"errors": [f"worker error: {_first_line(err)}"] * len(task.jobs), "seconds": 0.0}
            self._on_task(task, out)

    def run(self, rundir: RunDir) -> dict:
        import ray

        e = self.cfg.engine
        self.rundir = rundir
        self.sessions += 1
        self.worker_ready = [w not in self.given_up for w in range(len(self.workers))]
        self.slots = [e.queue_depth if ok else 0 for ok in self.worker_ready]
        self.worker_tasks = [deque() for _ in self.workers]
        self.worker_done_at = [time.perf_counter()] * len(self.workers)
        for info in self.worker_info:
            if info is not None:
                rundir.log_event({"event": "started", **info, "t": round(self.elapsed_before, 3)})
        for w, reason in sorted(self.given_up.items()):
            rundir.log_event({"event": "given_up", "worker": w, "reason": reason, "t": round(self.elapsed_before, 3)})
        for job in sorted(self.jobs.values(), key=lambda j: j.id):  # resumed: results still owed
            if job.result is None:
                self._route(job)
            elif not e.deterministic:
                self.ready.append(job)
        told_at_start = self.counts["told"]
        n = self.cfg.budget.max_evals
        self.stats_every = max(1, math.ceil(n / STATS_LINES)) if n is not None else None
        self.stats_mark = self.counts["told"] // self.stats_every if self.stats_every else 0
        self.stats_next_t = (math.floor(self.elapsed_before / STATS_EVERY_S) + 1) * STATS_EVERY_S
        self.stats_told = self.counts["told"]  # nothing new to log yet
        progress = Progress(self.cfg.budget.max_evals, self.cfg.progress_every_s, enabled=self.show_progress)
        self.session_start = time.perf_counter()
        cpu_start = time.process_time()
        self._checkpoint()
        every_s, every_n = e.checkpoint_every_s, e.checkpoint_every_evals
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
            if not self.jobs:
                if self.stop_reason is None:
                    self.stop_reason = "strategy_exhausted"  # asked nothing and awaits nothing
                    c = self.counts
                    if c["failed"] and c["failed"] > self.cfg.engine.max_failure_fraction * c["told"]:
                        self.stop_reason = "too_many_failures"  # e.g. every seed failed
                break
            t, n = self.last_checkpoint
            if time.perf_counter() - t >= every_s or (every_n and self.counts["told"] - n >= every_n):
                self._checkpoint()
            self._wait()
            progress.update(self.counts["told"], self.best["fitness"],
                            (self.counts["told"] - told_at_start) / max(time.perf_counter() - self.session_start, 1e-9))

        session_seconds = time.perf_counter() - self.session_start
        search_seconds = self.elapsed()
        driver_cpu = time.process_time() - cpu_start
        done_now = self.counts["told"] - told_at_start
        progress.close(self.counts["told"], self.best["fitness"], done_now / max(session_seconds, 1e-9))
        self._log_stats()  # the state at the end (unless the last line already shows it)
        self._checkpoint()
        self.session_start = None
        self.elapsed_before = search_seconds
        rundir.flush()

        done = self.counts["told"]
        summary = {
            "stop_reason": self.stop_reason,
            "evaluations": done,
            "search_seconds": round(search_seconds, 3),
            "startup_seconds": round(self.startup_seconds, 3),
            "evals_per_second": round(done_now / max(session_seconds, 1e-9), 2),
            "sessions": self.sessions,
            "workers": len(self.workers),
            "workers_live": sum(self.worker_ready),  # at the end; the others were lost
            "workers_given_up": len(self.given_up),  # could not start (e.g. no room left on the cluster)
            "worker_devices": [None if w is None else w.get("device") for w in self.worker_info],
            "batch_size": e.batch_size,
            "deterministic": e.deterministic,
            "worker_utilization": round(self.busy_seconds / max(len(self.workers) * search_seconds, 1e-9), 4),
            "driver_cpu_ms_per_eval": round(1e3 * driver_cpu / max(done_now, 1), 4),
            "engine_overhead_ms_per_eval": round(
                1e3 * max(0.0, search_seconds - self.busy_seconds / len(self.workers)) / max(done, 1), 4),
            "failed": self.counts["failed"],
            "retried": self.counts["retried"],
            "cached": self.counts["cached"],
            "timeouts": self.counts["timeouts"],
            "worker_replacements": self.counts["worker_replacements"],
        }
        per_candidate = self.time_per_candidate()
        if per_candidate:
            summary["time_per_candidate"] = per_candidate
        if self.last_failure:
            summary["last_failure"] = self.last_failure
        if self.front is not None:
            summary["pareto_front"] = {"objectives": self.front.objectives, "members": self.front.sorted()}
        if self.best["x"] is not None and self.stop_reason not in ("interrupted", "no_workers"):
            summary["best"] = self._save_best(rundir)
            if getattr(self, "shared", None) is not None:
                self._checkpoint()  # what scoring the best's held-out split spent (e.g. API requests)
        summary["strategy"] = self.strategy.summary()
        summary["driver_peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
        if self.stop_reason not in ("interrupted", "no_workers"):
            try:
                summary["worker_peak_rss_mb"] = [round(m, 1) for m in
                                                 ray.get([w.peak_rss_mb.remote() for w in self._live()])]
            except ray.exceptions.RayError:
                pass
        return summary

    def time_per_candidate(self) -> dict:
        """Mean seconds per evaluated candidate (the records of evaluations: not cached, not failed) of
        what the workers measured: {"candidates": n (the records with score_s), "merge_s", "score_s",
        "transfer_s": means over the records carrying each}; a key measured on fewer than n records also
        gets "<key>_candidates". transfer_s overlaps merge_s (the copies run during the merge). Empty
        when nothing was measured (e.g. a run of an older version)."""
        n = self.timing["score_s"][1]
        out: dict = {"candidates": n} if n else {}
        for k in TIMING_KEYS:
            total, count = self.timing[k]
            if count:
                out[k] = round(total / count, 6)
                if count != n:
                    out[f"{k}_candidates"] = count
        return out

    def _live(self) -> list:
        """The ready workers (a starting one may never be: calls to it could wait forever)."""
        return [a for a, ok in zip(self.workers, self.worker_ready) if ok]

    def _save_best(self, rundir: RunDir) -> dict:
        """Held-out metrics of the best, and the best model written to best/ (replaced atomically)."""
        import ray

        best = self.best
        live = self._live()
        for w in live + live[:1]:
            try:
                try:
                    holdout = ray.get(w.holdout.remote(best["x"]))
                except ray.exceptions.RayTaskError as err:  # the held-out split could not be scored (e.g. the
                    cause = err.cause if err.cause is not None else err  # API budget is spent): say so
                    holdout = {"error": f"{type(cause).__name__}: {str(cause).strip().splitlines()[-1][:300]}"}
                info = {"eval_id": best["id"], "fitness": best["fitness"], **best["metrics"], **holdout}
                tmp = rundir.path / ".best.tmp"
                shutil.rmtree(tmp, ignore_errors=True)
                ray.get(w.save.remote(best["x"], str(tmp.resolve()), info))
                break
            except ray.exceptions.RayActorError:
                continue
        else:
            raise RuntimeError("no worker is left to save the best model")
        shutil.rmtree(rundir.best, ignore_errors=True)
        os.replace(tmp, rundir.best)
        return {"eval_id": best["id"], "fitness": best["fitness"], "metrics": best["metrics"], "holdout": holdout}


_RESULT_KEYS = ("fitness", "metrics", "error", "worker", "seconds", "cached_from", "t", *TIMING_KEYS)


def _first_line(err: Exception) -> str:
    text = str(err).strip()
    return text.splitlines()[0][:300] if text else type(err).__name__


def _user_cause(err: Exception) -> Exception:
    """A UserError raised while a worker starts (e.g. a missing data file) stays one line."""
    cause = err  # Ray's RayTaskError(UserError) is a UserError too, but its text is a traceback: the
    while getattr(cause, "cause", None) is not None:  # innermost cause is the one raised
        cause = cause.cause
    return cause if isinstance(cause, UserError) else err
