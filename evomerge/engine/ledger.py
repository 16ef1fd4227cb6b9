"""The search's books: the jobs asked and not yet told, duplicates and the evaluation cache, the counts,
time sums, best and Pareto front. Its state is the "engine" part of the checkpoint."""
from __future__ import annotations

import math
from collections import OrderedDict, deque
from typing import Callable

import numpy as np

from evomerge.populations import Candidate

from ..config import EngineConfig
from ..journal import pack_scores, unpack_scores
from ..pareto import ParetoFront
from ..subsets import ExamplePlan, examples_id, race_stops
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

    def __init__(self, engine: EngineConfig, objectives: list[str], plan: ExamplePlan | None = None,
                 keep: Callable[[], int | None] | None = None, verify_top: int = 0,
                 combine: Callable[[np.ndarray | None, np.ndarray], tuple[float, dict]] | None = None):
        """`plan`: the run's example subsets (scoring active), `keep`: the strategy's ranks_used (racing; asked
        when a cohort is decided, since it may change, e.g. with Evo-Merging's stage),
        `verify_top`: estimates kept to re-score on every example at the end of a session."""
        self.engine = engine
        self.plan = plan
        self.keep = keep
        # (fitness, score-derived metrics) of per-example scores on some examples (Fitness.from_scores): a raced
        # candidate that goes on is scored on the rest of its examples only; None: on all of them again
        self.combine = combine
        self.verify_top = verify_top
        # index sets scored so far: id -> sorted indices (subsets.jsonl), and their identities
        self.draws: dict[int, list[int]] = {}
        self.draw_ids: dict[str, int] = {}
        self.new_draws: list[int] = []  # not yet written to subsets.jsonl
        self.races: OrderedDict[tuple, int] = OrderedDict()  # raced cohort -> its size (decided once whole)
        self.estimates: list[dict] = []  # the best estimated results told: {"fitness", "id", "x", "metrics"}
        self.verified: dict[int, dict] = {}  # eval id -> its full-split result (fitness, metrics; or failed)
        self.next_id = 0
        self.next_group = 0
        self.groups: OrderedDict[int, list[Job]] = OrderedDict()
        self.jobs: dict[int, Job] = {}
        self.counts = {"told": 0, "failed": 0, "cached": 0, "retried": 0, "worker_replacements": 0,
                       "timeouts": 0, "examples_scored": 0, "raced": 0, "estimated": 0}
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
            job = Job(first + i, group, c, candidate_key(recipe), recipe)
            self._plan(job)
            jobs.append(job)
        self.next_group += 1
        self.next_id += len(jobs)
        self.groups[group] = jobs
        for j in jobs:
            self.jobs[j.id] = j
        return jobs

    def _plan(self, job: Job) -> None:
        """The examples a job is scored on: the strategy's (Candidate.examples), else its cohort's draw."""
        c = job.candidate
        if c.examples is not None:
            job.examples = np.asarray(c.examples, np.int64)
        elif self.plan is not None:
            key = c.cohort if c.cohort is not None else job.group
            job.examples, first = self.plan.draw(key)
            if first is not None and self.keep is not None and c.cohort is not None:
                job.first = first
                job.cohort = (c.cohort,)
                if job.cohort not in self.races:
                    self.races[job.cohort] = int(c.cohort_size or 0)
                    while len(self.races) > 256:  # cohorts long decided
                        self.races.popitem(last=False)
        job.draw = self._draw_id(job.examples)
        job.first_draw = self._draw_id(job.first)
        if job.key is not None and (job.examples is not None or job.first is not None):
            job.key = f"{job.key}:{job.draw}:{job.first_draw}"  # a duplicate only on the same examples

    def _draw_id(self, examples: np.ndarray | None) -> int | None:
        if examples is None:
            return None
        ident = examples_id(examples)
        d = self.draw_ids.get(ident)
        if d is None:
            d = self.draw_ids[ident] = len(self.draw_ids)
            self.draws[d] = [int(i) for i in examples]
            self.new_draws.append(d)
        return d

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
        if job.verify:
            self.verified[job.id] = {k: result.get(k) for k in ("fitness", "metrics", "failed", "error")}
            return
        job.result, job.scores = result, scores
        if job.cohort is not None:
            self._race(job.cohort)
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
            sent = job.sending()
            self.counts["examples_scored"] += self._n(sent, scores)
            if sent is not None and sent is job.first and not result["failed"]:
                job.first_out = (result, scores)  # the first slice: the cohort decides whether it goes on
                self._race(job.cohort)
                continue
            if job.first_out is not None:  # finished after racing: both slices' seconds
                result, scores = self._joined(job, result, scores)
            self.resolve(job, result, scores)
        return stop

    def _joined(self, job: Job, result: dict, scores) -> tuple[dict, np.ndarray | None]:
        """A raced job's result once it went on: the first slice's and the rest's scores joined in index
        order, the fitness and score-derived metrics from them, other metrics (e.g. requests) and seconds
        summed (the rest alone was scored); or the second evaluation's (it scored all its examples)."""
        first, first_scores = job.first_out
        joined = dict(result)
        for k in ("seconds", *TIMING_KEYS):
            if first.get(k) is not None and result.get(k) is not None:
                joined[k] = round(result[k] + first[k], 6)
        if job.rest is None or first_scores is None or scores is None:
            return joined, scores
        idx = np.concatenate([job.first, job.rest])
        order = np.argsort(idx, kind="stable")
        all_scores = np.concatenate([np.asarray(first_scores, np.float64).reshape(-1),
                                     np.asarray(scores, np.float64).reshape(-1)])[order]
        fit, derived = self.combine(job.examples, all_scores)
        metrics = {k: first["metrics"].get(k, 0.0) + v for k, v in result["metrics"].items() if k not in derived}
        joined.update(fitness=float(fit), metrics={**metrics, **derived})
        if not np.isfinite(fit):
            joined.update(fitness=None, failed=True, error=f"fitness is {fit}")
        return joined, all_scores

    def _n(self, sent, scores) -> int:
        if sent is not None:
            return int(sent.size)
        if self.plan is not None:
            return self.plan.total
        return 0 if scores is None else int(np.asarray(scores).size)

    # racing ------------------------------------------------------------------------------
    def _members(self, cohort: tuple) -> list[Job]:
        return [j for j in self.jobs.values() if j.cohort == cohort]

    def _race(self, cohort: tuple, flush: bool = False) -> None:
        """Decide the cohort's waiting members once every member asked has its first slice (or a result),
        and the cohort is whole (or `flush`: the run asks no more): stopped ones are resolved with their
        slice's estimate, the others go on to all their examples (first in the queue)."""
        size = self.races.get(cohort)
        if size is None:
            return
        members = self._members(cohort)
        waiting = [j for j in members if j.first_out is not None and j.result is None and not j.decided]
        if not waiting:
            return
        pending = [j for j in members if j.result is None and j.first_out is None and not self._follows(j)]
        if pending or (not flush and len(members) < size):
            return
        first = {j.id: j.first_out[1] for j in members if j.first_out is not None and j.first_out[1] is not None}
        n_total = self.plan.k
        keep = self.keep()
        stops = set() if not keep else race_stops(first, n_total, keep, self.plan.scoring.race.confidence,
                                                  max(size, len(members)))
        for j in waiting:  # all marked first: resolving one below re-enters _race for this cohort
            j.decided = True
        for j in waiting:
            if j.id in stops:
                result, scores = j.first_out
                self.counts["raced"] += 1
                self.resolve(j, {**result, "raced": True}, scores)
            else:
                if self.combine is not None:
                    every = j.examples if j.examples is not None else np.arange(self.plan.total, dtype=np.int64)
                    j.rest = np.setdiff1d(every, j.first, assume_unique=True)
                self.queue.appendleft(j)

    def _follows(self, job: Job) -> bool:
        leader = self.leaders.get(job.key)
        return leader is not None and leader is not job

    def flush_races(self) -> bool:
        """Decide every cohort with the members it has (the run asks no more, or nothing else is left to
        run); whether any member was decided."""
        before = self.counts["raced"], len(self.queue)
        for cohort in list(self.races):
            self._race(cohort, flush=True)
        return (self.counts["raced"], len(self.queue)) != before


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
            for k in TIMING_KEYS:
                if k in rec:
                    self.timing[k][0] += rec[k]
                    self.timing[k][1] += 1
            if rec.get("cached_from") is not None:
                self.counts["cached"] += 1
            if rec.get("estimate"):  # part of the examples: a candidate for the best once verified
                self.counts["estimated"] += 1
                self._estimate(job, rec)
                continue
            if rec.get("cached_from") is None and self.front is not None:
                self.front.add(job.id, rec["fitness"], rec["metrics"])
            self._full(job.id, job.candidate.x, rec["fitness"], rec["metrics"])

    def _full(self, id: int, x, fitness: float, metrics: dict) -> None:
        if fitness > self.best["fitness"]:
            self.best = {"fitness": fitness, "id": id, "x": x, "metrics": metrics}

    def _estimate(self, job: Job, rec: dict) -> None:
        """Keep the verify_top best estimates (by estimated fitness; one per recipe)."""
        if not self.verify_top or rec.get("cached_from") is not None:
            return
        est = {"fitness": rec["fitness"], "id": job.id, "x": job.candidate.x, "metrics": rec["metrics"],
               "key": job.key.split(":")[0] if job.key else None}
        if est["key"] is not None and any(e["key"] == est["key"] for e in self.estimates):
            return
        self.estimates.append(est)
        self.estimates.sort(key=lambda e: -e["fitness"])
        del self.estimates[self.verify_top:]

    def shown_best(self) -> tuple[str, float]:
        """What a progress line shows: the best full score, else (scoring on subsets) the best estimate."""
        if self.best["id"] is None and self.estimates:
            return "best estimate", self.estimates[0]["fitness"]
        return "best", self.best["fitness"]

    def to_verify(self) -> list[Job]:
        """Jobs re-scoring, on every example, the kept estimates not verified yet (see Engine.verify)."""
        out = []
        for e in self.estimates:
            if e["id"] not in self.verified:
                out.append(Job(e["id"], -1, Candidate(e["x"], -1), None, None, verify=True))
        return out

    def take_verified(self) -> None:
        """The verified estimates' full-split results: the best of them may be the run's best, and the
        Pareto front holds them."""
        for e in self.estimates:
            v = self.verified.get(e["id"])
            if v is None or v.get("failed"):
                continue
            if self.front is not None and not any(m["eval_id"] == e["id"] for m in self.front.members):
                self.front.add(e["id"], v["fitness"], v["metrics"])
            self._full(e["id"], e["x"], v["fitness"], v["metrics"])

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
                 "candidate": j.candidate, "key": j.key, "recipe": j.recipe, "attempts": j.attempts,
                 "result": j.result, "scores": pack_scores(j.scores), "examples": j.examples, "first": j.first,
                 "draw": j.draw, "first_draw": j.first_draw, "cohort": j.cohort, "decided": j.decided, "rest": j.rest,
                 "first_out": None if j.first_out is None else (j.first_out[0], pack_scores(j.first_out[1]))}
                for g in self.groups.values() for j in g]
        return {"next_id": self.next_id, "next_group": self.next_group, "jobs": jobs,
                "counts": dict(self.counts), "busy_seconds": self.busy_seconds,
                "timing": {k: list(v) for k, v in self.timing.items()}, "best": dict(self.best),
                "cache": [(k, r, pack_scores(s)) for k, (r, s) in self.cache.items()],
                "last_failure": self.last_failure,
                "front": None if self.front is None else self.front.members,
                "draws": dict(self.draws), "races": dict(self.races), "estimates": list(self.estimates),
                "verified": dict(self.verified)}

    def load_state_dict(self, st: dict) -> None:
        self.next_id, self.next_group = st["next_id"], st["next_group"]
        self.groups.clear()
        self.jobs.clear()
        for d in st["jobs"]:
            c = d.get("candidate") or Candidate(d["x"], d["step"], d["tag"])
            job = Job(d["id"], d["group"], c, d["key"], d["recipe"],
                      attempts=d["attempts"], result=d["result"], scores=unpack_scores(d["scores"]))
            for k in ("examples", "first", "draw", "first_draw", "cohort", "decided", "rest"):
                if k in d:
                    setattr(job, k, d[k])
            if d.get("first_out") is not None:
                r, sc = d["first_out"]
                job.first_out = (r, unpack_scores(sc))
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
        self.draws = {int(k): list(v) for k, v in (st.get("draws") or {}).items()}  # older checkpoints: none
        self.draw_ids = {examples_id(np.asarray(v, np.int64)): k for k, v in self.draws.items()}
        self.new_draws = []
        self.races = OrderedDict(st.get("races") or {})
        self.estimates = list(st.get("estimates") or [])
        self.verified = dict(st.get("verified") or {})
