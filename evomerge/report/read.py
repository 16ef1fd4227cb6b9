"""A run as the report sees it (`Run`): config, summary, every evaluation record as columns, the
strategy's statistics and the worker events, read through evomerge.rundir; and the strategy's final
archive from the checkpoint."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import UserError
from ..rundir import (CONFIG, EVALS, EVENTS, STATS, TIMING_KEYS, EvalRecords, is_run_dir, read_checkpoint, read_config,
                      read_jsonl, read_summary)

CHECKPOINT_MAX_BYTES = 2 << 30  # archive.png: larger checkpoints are not unpickled


@dataclass
class Run:
    """A run directory's records as columns (one entry per record of evals.jsonl, in file order), its
    config and summary (None: none yet), the strategy's statistics and the worker events."""

    path: Path
    name: str
    config: dict
    summary: dict | None
    n: int
    ids: np.ndarray
    fitness: np.ndarray  # NaN where failed
    failed: np.ndarray
    cached: np.ndarray
    worker: np.ndarray  # -1: none (cached, failed without a worker)
    seconds: np.ndarray  # NaN: none
    t: np.ndarray  # NaN: no time stamp (records of older versions)
    metrics: dict[str, np.ndarray]
    objectives: list[str]
    stats: list[dict] = field(default_factory=list)
    events: list[dict] = field(default_factory=list)
    torn: bool = False  # the last line of evals.jsonl was cut off (a run being written, or killed)
    timing: dict[str, np.ndarray] = field(default_factory=dict)  # merge_s, score_s, transfer_s (NaN: none)

    @property
    def strategy(self) -> str:
        return str((self.config.get("strategy") or {}).get("name", "?"))

    @property
    def has_t(self) -> bool:
        return bool(np.isfinite(self.t).any())

    def best_so_far(self) -> np.ndarray:
        f = np.where(np.isnan(self.fitness), -np.inf, self.fitness)
        return np.maximum.accumulate(f)

    def best_index(self) -> np.ndarray:
        """Index of the best evaluation so far after each record (-1 before the first success);
        the first of equal fitnesses, as the engine keeps it."""
        f = np.where(np.isnan(self.fitness), -np.inf, self.fitness)
        prev = np.concatenate([[-np.inf], np.maximum.accumulate(f)[:-1]])
        new = f > prev
        return np.maximum.accumulate(np.where(new, np.arange(self.n), -1))

    def workers_count(self) -> int:
        w = (self.config.get("engine") or {}).get("workers")
        seen = int(self.worker.max()) + 1 if self.n else 0
        return max(int(w) if isinstance(w, int) else 0, seen, 1)


def not_a_run(path: Path) -> UserError:
    return UserError(f"report {path}: not a run directory ({CONFIG} and {EVALS} expected)")


def read_run(path: str | Path) -> Run:
    """Run directory `path` as a Run (a UserError when it is not one, or holds no evaluation yet)."""
    path = Path(path)
    if not path.is_dir() or not is_run_dir(path):
        raise not_a_run(path)
    config = read_config(path)
    summary = read_summary(path)

    ids, fit, failed, cached, worker, seconds, t = [], [], [], [], [], [], []
    timing: dict[str, list] = {k: [] for k in TIMING_KEYS}
    metrics: dict[str, list] = {}
    nan = math.nan
    records = EvalRecords(path)  # a torn line (the driver was killed while writing it) is skipped
    for r in records:
        i = len(ids)
        ids.append(r.get("id", i))
        v = r.get("fitness")
        fit.append(nan if v is None else v)
        failed.append(bool(r.get("failed")))
        cached.append(r.get("cached_from") is not None)
        w = r.get("worker")
        worker.append(-1 if w is None else w)
        s = r.get("seconds")
        seconds.append(nan if s is None else s)
        s = r.get("t")
        t.append(nan if s is None else s)
        if "score_s" in r:  # timings: absent from cached and failed records, and in older versions
            for k, col in timing.items():
                s = r.get(k)
                if type(s) in (float, int):
                    col.append((i, s))
        m = r.get("metrics")
        if m:
            for k, v in m.items():
                col = metrics.get(k)
                if col is None:
                    col = metrics[k] = [nan] * i
                col.append(v if type(v) in (float, int) else nan)
        for col in metrics.values():  # a metric missing from this record
            if len(col) == i:
                col.append(nan)
    n = len(ids)
    if n == 0:
        raise UserError(f"report {path}: {EVALS} holds no evaluation yet")
    run = Run(path=path, name=path.resolve().name, config=config, summary=summary, n=n,
              ids=np.asarray(ids, np.int64), fitness=np.asarray(fit, np.float64), failed=np.asarray(failed),
              cached=np.asarray(cached), worker=np.asarray(worker, np.int64),
              seconds=np.asarray(seconds, np.float64), t=np.asarray(t, np.float64),
              metrics={k: np.asarray(v, np.float64) for k, v in metrics.items()},
              objectives=_objectives(config, summary), torn=records.torn,
              timing={k: _sparse(v, n) for k, v in timing.items() if v})
    run.stats = read_jsonl(path, STATS)
    run.events = read_jsonl(path, EVENTS)
    return run


def _sparse(pairs: list[tuple[int, float]], n: int) -> np.ndarray:
    out = np.full(n, np.nan)
    idx, vals = zip(*pairs)
    out[list(idx)] = vals
    return out


def _objectives(config: dict, summary: dict | None) -> list[str]:
    """The fitness's objectives: from summary.json's Pareto front, else from the fitness class."""
    if summary is not None:
        return list((summary.get("pareto_front") or {}).get("objectives") or [])
    try:
        from evomerge.fitness import FITNESSES

        cfg = dict(config["fitness"])
        cfg_cls, cls = FITNESSES[cfg["name"]]
        return list(cls.objectives(cfg_cls(**cfg)))
    except Exception:  # noqa: BLE001 - an old or foreign config: no objectives known
        return []


def keeps_archive(run: Run) -> bool:
    """The run's strategy keeps an archive a report shows (`Strategy.has_archive`)."""
    from evomerge.populations import STRATEGIES

    entry = STRATEGIES.get(run.strategy)
    return entry is not None and entry[1].has_archive


def read_archive(run: Run) -> dict | None:
    """The strategy's final archive as its class shows it (`Strategy.archive_view` of the checkpoint's
    "strategy" entry): {"scores": (members, examples), "fitness": (members,)}. None when the strategy
    shows none (no archive, or nothing in it) or the run has no readable checkpoint (missing, damaged, or
    larger than CHECKPOINT_MAX_BYTES: not unpickled)."""
    from evomerge.populations import STRATEGIES

    entry = STRATEGIES.get(run.strategy)
    if entry is None:
        return None
    try:
        state = read_checkpoint(run.path, f"report {run.path}", CHECKPOINT_MAX_BYTES)["strategy"]
    except UserError:
        return None
    return entry[1].archive_view(state)
