"""A candidate from ask to tell (Job), one call to a worker (Batch), and the record evals.jsonl keeps."""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field

import numpy as np

from evomerge.populations import Candidate, Result

from ..rundir import TIMING_KEYS

# what a job's result holds (and what a replayed tell reads back from its record)
RESULT_KEYS = ("fitness", "metrics", "error", "worker", "seconds", "cached_from", "t", "raced", *TIMING_KEYS)


@dataclass(eq=False)
class Job:
    """One candidate from ask to tell. `result` is set once its evaluation (or a cached one) is known."""

    id: int
    group: int  # the ask it came from
    candidate: Candidate
    key: str | None  # identity of a recipe (None in spaces whose vector is the model)
    recipe: dict | None
    attempts: int = 0  # failed attempts so far
    isolate: bool = False  # dispatched alone (after a failure inside a batch)
    result: dict | None = None  # fitness, metrics, failed, error, worker, seconds, cached_from, TIMING_KEYS
    scores: np.ndarray | None = None
    followers: list = field(default_factory=list)  # duplicates waiting for this evaluation
    # example subsets (see evomerge.subsets): the examples its told result is on (None: all), racing's first
    # slice of them (None: not raced), the ids of both in the run's subsets.jsonl, the cohort it is raced in
    examples: np.ndarray | None = None
    first: np.ndarray | None = None
    draw: int | None = None
    first_draw: int | None = None
    cohort: tuple | None = None
    first_out: tuple | None = None  # (result, scores) of the first slice, while raced
    decided: bool = False  # raced and told to go on to all its examples
    rest: np.ndarray | None = None  # what it goes on to: its examples but the first slice (None: all of them)
    verify: bool = False  # a re-scoring of a told estimate on every example (not told to the strategy)

    def sending(self) -> np.ndarray | None:
        """The examples its next evaluation scores: the first slice while raced, else all of its own."""
        if self.first is not None and self.first_out is None:
            return self.first
        return self.rest if self.rest is not None else self.examples

    @property
    def estimate(self) -> bool:
        """Its told result is from part of the search examples (a subset, or stopped by racing)."""
        return self.examples is not None or bool(self.result and self.result.get("raced"))


@dataclass(eq=False)
class Batch:
    """One call to a worker: the jobs it scores, sent at `sent` (perf_counter); `handle` is the pool's
    reference to the call's result."""

    worker: int
    jobs: list[Job]
    sent: float
    handle: object = None


def candidate_key(recipe: dict | None) -> str | None:
    """Identity of a candidate: a hash of its recipe. Spaces without recipes (the vector is the
    model, e.g. digits, where an evaluation costs about as much as hashing the vector) have none:
    their candidates are neither deduplicated nor cached."""
    if recipe is None:
        return None
    return hashlib.sha256(json.dumps(recipe, sort_keys=True, separators=(",", ":")).encode()).hexdigest()[:24]


def fingerprint(job: Job):
    """What the journal keeps of an asked candidate, to check that a replayed ask repeats it."""
    return job.key if job.key is not None else (float(np.sum(job.candidate.x, dtype=np.float64)),
                                                job.candidate.step)


def served(result: dict, source: int) -> dict:
    """The result of a duplicate, served from evaluation `source` (no worker, no time of its own)."""
    return {**result, "cached_from": source, "worker": None, "seconds": 0.0, **dict.fromkeys(TIMING_KEYS)}


def failed(reason: str) -> dict:
    """The result of a job given up after its attempts."""
    return {"fitness": None, "metrics": {}, "failed": True, "error": reason, "worker": None, "seconds": None,
            "cached_from": None}


def told(job: Job, t: float | None, penalty: float | None) -> tuple[dict, Result]:
    """The evals.jsonl record of a job whose result is known (t: search seconds when told), and what the
    strategy is told (a failed job: `penalty`, or -inf)."""
    r = job.result
    record = {"id": job.id, "step": job.candidate.step}
    if job.key is not None:
        record["key"] = job.key
    raced = bool(r.get("raced"))
    used, draw = (job.first, job.first_draw) if raced else (job.examples, job.draw)
    if used is not None:  # scored on part of the search examples: subsets.jsonl lists draw's indices
        record["examples"] = {"draw": draw, "n": int(used.size)}
        record["estimate"] = True
        if raced:
            record["raced"] = True
    if r["failed"]:
        record.update(failed=True, error=r["error"], fitness=None)
    else:
        record.update(fitness=r["fitness"], metrics=r["metrics"])
    record.update(worker=r["worker"], seconds=r["seconds"])
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
    fitness = (penalty if penalty is not None else -np.inf) if r["failed"] else r["fitness"]
    return record, Result(job.candidate, fitness, job.scores, r["metrics"] if not r["failed"] else {},
                          failed=r["failed"], examples=used, raced=raced)
