"""A synthetic fitness with a chosen cost and chosen faults, for engine tests and benchmarks.

Per-example scores: exp(-|x - c_i|^2 / dim) for `n_examples` fixed random centres c_i; the fitness
is their mean. Each evaluation sleeps a log-normal time (median `delay_ms`, shape `delay_sigma`).
Faults are drawn per candidate from a hash of its vector (the same candidate always fails the
same way) except `flaky_rate`, drawn afresh at every attempt.
"""
from __future__ import annotations

import hashlib
import os
import time
from typing import Literal

import numpy as np
from pydantic import Field

from evomerge.schema import Frozen

from .base import BatchEvaluation, Fitness, split_examples, task_summary


class SyntheticFitnessConfig(Frozen):
    name: Literal["synthetic"]
    n_examples: int = Field(32, ge=1, description="per-example scores per evaluation")
    n_tasks: int = Field(1, ge=1, description="examples split into this many tasks, each an objective "
                                              "'task<i>_accuracy' (mean score of its examples)")
    delay_ms: float = Field(0.0, ge=0, description="median seconds x 1e3 each evaluation sleeps (0: none)")
    delay_sigma: float = Field(0.0, ge=0, description="sigma of the log-normal sleep (0: always the median)")
    fail_rate: float = Field(0.0, ge=0, le=1, description="share of candidates whose evaluation raises")
    nan_rate: float = Field(0.0, ge=0, le=1, description="share of candidates scored NaN")
    hang_rate: float = Field(0.0, ge=0, le=1, description="share of candidates that sleep hang_s")
    hang_s: float = Field(3600.0, gt=0, description="how long a hanging evaluation sleeps")
    crash_rate: float = Field(0.0, ge=0, le=1, description="share of candidates that kill their worker process")
    flaky_rate: float = Field(0.0, ge=0, le=1, description="chance that any attempt raises (transient)")


class SyntheticFitness(Fitness):
    input = "vector"
    spaces = ("synthetic",)

    def __init__(self, cfg: SyntheticFitnessConfig, shared=None):
        super().__init__(cfg, shared)
        self.rng = np.random.default_rng()  # sleeps and flaky faults: fresh in every process
        self.centres = None

    def _scores(self, x: np.ndarray) -> np.ndarray:
        if self.centres is None or self.centres.shape[1] != x.size:
            self.centres = np.random.default_rng(1234).uniform(-1, 1, (self.cfg.n_examples, x.size))
        d = ((self.centres - np.asarray(x, np.float64)) ** 2).sum(axis=1) / x.size
        return np.exp(-d)

    def _one(self, x: np.ndarray) -> np.ndarray:
        c = self.cfg
        u = int.from_bytes(hashlib.blake2b(np.ascontiguousarray(x).tobytes(), digest_size=8).digest(), "little") / 2**64
        if c.delay_ms:
            time.sleep(c.delay_ms / 1e3 * float(np.exp(c.delay_sigma * self.rng.standard_normal())))
        edges = np.cumsum([c.fail_rate, c.nan_rate, c.hang_rate, c.crash_rate])
        if u < edges[0]:
            raise ValueError("synthetic failure (fail_rate)")
        if u < edges[1]:
            return np.full(c.n_examples, np.nan)
        if u < edges[2]:
            time.sleep(c.hang_s)
        elif u < edges[3]:
            os._exit(17)
        if c.flaky_rate and self.rng.random() < c.flaky_rate:
            raise RuntimeError("synthetic transient failure (flaky_rate)")
        return self._scores(x)

    @classmethod
    def example_counts(cls, cfg: SyntheticFitnessConfig) -> list[int]:
        return [len(p) for p in np.array_split(np.arange(cfg.n_examples), cfg.n_tasks)]

    @classmethod
    def from_scores(cls, cfg: SyntheticFitnessConfig, counts, examples, scores):
        s = np.asarray(scores, np.float64).reshape(1, -1)
        names = [f"task{i}" for i in range(cfg.n_tasks)]
        fit, metrics = task_summary(names, [float(c) for c in counts], counts, examples, s)
        if examples is None or cfg.n_tasks == 1:
            fit = float(s.mean())
        out = metrics if cfg.n_tasks > 1 else {}
        return fit, {**out, "mean_score": float(s.mean())}

    @classmethod
    def objectives(cls, cfg: SyntheticFitnessConfig) -> list[str]:
        return [f"task{i}_accuracy" for i in range(cfg.n_tasks)] if cfg.n_tasks > 1 else []

    def evaluate(self, batch: np.ndarray, examples: np.ndarray | None = None) -> BatchEvaluation:
        """Each task weighs as its number of examples: the fitness is the mean score over all examples, and
        over a subset the mean of its tasks' means weighted so (the stratified estimate of it)."""
        scores = np.stack([self._one(x) for x in batch])
        counts = self.example_counts(self.cfg)
        edges = np.concatenate([[0], np.cumsum(counts)])
        kept, means, weights, metrics = [], [], [], {}
        for i, sel in enumerate(split_examples(examples, counts)):
            idx = np.arange(edges[i], edges[i + 1]) if sel is None else sel + edges[i]
            kept.append(idx)
            if idx.size:
                means.append(scores[:, idx].mean(axis=1))
                weights.append(counts[i])
                if self.cfg.n_tasks > 1:
                    metrics[f"task{i}_accuracy"] = means[-1]
        if examples is not None:
            scores = np.ascontiguousarray(scores[:, np.concatenate(kept)])
        fit = (scores.mean(axis=1) if examples is None or len(means) == 1
               else np.average(np.stack(means), axis=0, weights=weights))
        metrics["mean_score"] = scores.mean(axis=1)
        return BatchEvaluation(fitness=fit, scores=scores, metrics=dict(sorted(metrics.items())))

    def holdout(self, x: np.ndarray) -> dict[str, float]:
        return {"holdout_score": float(self._scores(x).mean())}
