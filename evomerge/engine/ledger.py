"""The search's books: the jobs asked and not yet told, duplicates and the evaluation cache, the counts,
time sums, best and Pareto front. Its state is the "engine" part of the checkpoint."""
from __future__ import annotations

import math
from collections import OrderedDict, deque

import numpy as np

from evomerge.populations import Candidate

from ..config import EngineConfig
from ..journal import pack_scores, unpack_scores
from ..pareto import ParetoFront
from .jobs import TIMING_KEYS, Batch, Job, candidate_key, failed, served

MIN_FAILURES_TO_STOP = 10


class Ledger:
    """What the search has asked and learnt so far.

    Checkpointed: `groups` (asked, not yet told, by ask), the id counters, `counts`, `busy_seconds`,
    `timing` (key -> [sum, count] over the told records carrying it), `best`, the evaluation `cache`
    (recipe key -> (record, scores), least recently used first), the Pareto `front` (two or more
    objectives) and `last_failure`. Live only: `queue` (jobs waiting for a worker), `leaders` (the job
    in flight for each recipe key; its duplicates follow it) and `known` (results known, not yet told:
    steady-state mode, where whatever is known is told; deterministic mode tells whole groups in order).
    """

    def __init__(self, engine: EngineConfig, objectives: list[str]):
        self.engine = engine
        self.next_id = 0
        self.next_group = 0
        self.groups: OrderedDict[int, list[Job]] = OrderedDict()
        self.jobs: dict[int, Job] = {}
        self.counts = {"told": 0, "failed": 0, "cached": 0, "retried": 0, "worker_replacements": 0,
                       "timeouts": 0}
        self.busy_seconds = 0.0
        self.timing = {k: [0.0, 0] for k in TIMING_KEYS}
        self.best = {"fitness": -np.inf, "id": None, "x": None, "metrics": {}}
        self.cache: OrderedDict[str, tuple[dict, np.ndarray | None]] = OrderedDict()
        self.front = ParetoFront(objectives) if len(objectives) > 1 else None
        self.last_failure: str | None = None
        self.queue: deque[Job] = deque()
        self.leaders: dict[str, Job] = {}
        self.known: list[Job] = []

    # asked ------------------------------------------------------------------------------
    def add_group(self, candidates: list[Candidate], space) -> list[Job]:
        """The jobs of one ask (ids in order), recorded as asked; `space` makes their recipes."""
        group, first = self.next_group, self.next_id
        jobs = []
        for i, c in enumerate(candidates):
            recipe = space.recipe(c.x)
            jobs.append(Job(first + i, group, c, candidate_key(recipe), recipe))
        self.next_group += 1
        self.next_id += len(jobs)
        self.groups[group] = jobs
        for j in jobs:
            self.jobs[j.id] = j
        return jobs

    def route(self, job: Job) -> None:
        """Serve a duplicate from the cache or from the same candidate in flight, else queue it."""
        if job.key is None:
            self.queue.append(job)
            return
        hit = self.cache.get(job.key)
        if hit is not None:
            self.cache.move_to_end(job.key)
            record, scores = hit
            self.resolve(job, served(record, record["id"]), scores)
        elif job.key in self.leaders:
            self.leaders[job.key].followers.append(job)
        else:
            self.leaders[job.key] = job
            self.queue.append(job)

    # learnt ------------------------------------------------------------------------------
    def resolve(self, job: Job, result: dict, scores) -> None:
        """The result of a job is known; its followers get it too, and the cache keeps it."""
        job.result, job.scores = result, scores
        if self.leaders.get(job.key) is job:
            del self.leaders[job.key]
        if not self.engine.deterministic:
            self.known.append(job)
        for f in job.followers:
            self.resolve(f, served(result, job.id), scores)
        job.followers = []
        if result.get("cached_from") is None and self.engine.cache_size and job.key is not None:
            self.cache[job.key] = ({**result, "id": job.id}, scores)
            while len(self.cache) > self.engine.cache_size:
                self.cache.popitem(last=False)

    def retry_or_fail(self, job: Job, reason: str) -> None:
        """A failed attempt: the job goes to the front of the queue, alone, or fails after max_retries."""
        job.attempts += 1
        if job.attempts > self.engine.max_retries:
            self.resolve(job, failed(reason), None)
        else:
            self.counts["retried"] += 1
            job.isolate = True
            self.queue.appendleft(job)

    def requeue_lost(self, batches: list[Batch], reason: str) -> None:
        """The batches of a worker that died or hung go back to the queue. The candidates of the batch it
        was running are re-sent one per call, so that the one that killed it is found: a candidate alone
        in its call counts a failed attempt. Batches queued behind it are re-sent as they were."""
        back: list[Job] = []
        for i, batch in enumerate(batches):
            for job in batch.jobs:
                if i == 0 and len(batch.jobs) == 1:
                    self.retry_or_fail(job, reason)
                else:
                    job.isolate = job.isolate or i == 0
                    back.append(job)
        self.queue.extendleft(reversed(back))

    def take(self, batch: Batch, out: dict) -> str | None:
        """What a worker returned for a batch (see FitnessWorker.evaluate). Returns the error of a
        candidate that asks the run to stop (StopRun, e.g. an API budget spent; it stays asked, not
        told), else None."""
        self.busy_seconds += out["seconds"]
        per = out["seconds"] / len(batch.jobs)
        timing = out.get("timing") or [None] * len(batch.jobs)
        stop = None
        for j, job in enumerate(batch.jobs):
            err = out["errors"][j]
            if err is not None and err.startswith("StopRun:"):
                self.queue.appendleft(job)
                self.last_failure = stop = err
                continue
            if err is not None:
                self.retry_or_fail(job, err)
                continue
            fit = float(out["fitness"][j])
            metrics = {k: float(v[j]) for k, v in out["metrics"].items()}
            scores = None if out["scores"] is None else out["scores"][j]
            result = {"fitness": fit, "metrics": metrics, "failed": False, "error": None, "worker": batch.worker,
                      "seconds": round(per, 6), "cached_from": None}
            for k, v in (timing[j] or {}).items():
                if k in TIMING_KEYS and v is not None and math.isfinite(v):
                    result[k] = round(max(float(v), 0.0), 6)
            if not np.isfinite(fit):
                result.update(fitness=None, failed=True, error=f"fitness is {fit}")
            self.resolve(job, result, scores)
        return stop

    # told --------------------------------------------------------------------------------
    def to_tell(self) -> list[Job]:
        """What is told next: the oldest group once all of it is known (deterministic), else every job
        known so far, by id."""
        if self.engine.deterministic:
            if self.groups:
                jobs = next(iter(self.groups.values()))
                if all(j.result is not None for j in jobs):
                    return list(jobs)
            return []
        jobs, self.known = sorted(self.known, key=lambda j: j.id), []
        return jobs

    def close(self, jobs: list[Job], records: list[dict]) -> None:
        """Jobs told, with their records: off the books, into the counts, best, front and time sums."""
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
                continue
            if rec.get("cached_from") is not None:
                self.counts["cached"] += 1
            elif self.front is not None:
                self.front.add(job.id, rec["fitness"], rec["metrics"])
            for k in TIMING_KEYS:
                if k in rec:
                    self.timing[k][0] += rec[k]
                    self.timing[k][1] += 1
            if rec["fitness"] > self.best["fitness"]:
                self.best = {"fitness": rec["fitness"], "id": job.id, "x": job.candidate.x, "metrics": rec["metrics"]}

    def too_many_failures(self, at_least: int = MIN_FAILURES_TO_STOP) -> bool:
        """More than engine.max_failure_fraction of the told evaluations failed (and at least `at_least`)."""
        c = self.counts
        return c["failed"] >= max(at_least, 1) and c["failed"] > self.engine.max_failure_fraction * c["told"]

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

    # checkpoint --------------------------------------------------------------------------
    def state_dict(self) -> dict:
        jobs = [{"id": j.id, "group": j.group, "x": j.candidate.x, "step": j.candidate.step, "tag": j.candidate.tag,
                 "key": j.key, "recipe": j.recipe, "attempts": j.attempts, "result": j.result,
                 "scores": pack_scores(j.scores)} for g in self.groups.values() for j in g]
        return {"next_id": self.next_id, "next_group": self.next_group, "jobs": jobs,
                "counts": dict(self.counts), "busy_seconds": self.busy_seconds,
                "timing": {k: list(v) for k, v in self.timing.items()}, "best": dict(self.best),
                "cache": [(k, r, pack_scores(s)) for k, (r, s) in self.cache.items()],
                "last_failure": self.last_failure,
                "front": None if self.front is None else self.front.members}

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
        self.best = st["best"]
        self.cache = OrderedDict((k, (r, unpack_scores(s))) for k, r, s in st["cache"])
        self.last_failure = st["last_failure"]
        if self.front is not None and st.get("front") is not None:
            self.front.members = st["front"]
