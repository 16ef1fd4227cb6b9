"""Digits classification: per-example correctness on the 1,437 training digits; test accuracy on 360."""
from __future__ import annotations

from typing import Literal

import numpy as np
from pydantic import Field

from evomerge.schema import Frozen

from .base import BatchEvaluation, Fitness


class DigitsFitnessConfig(Frozen):
    name: Literal["digits"]
    train_fraction: float = Field(0.8, gt=0, lt=1, description="leading share of load_digits() used for the search")


class DigitsFitness(Fitness):
    input = "vector"
    spaces = ("digits_mlp",)

    def __init__(self, cfg: DigitsFitnessConfig, shared=None):
        super().__init__(cfg, shared)
        from evomerge.demos import digits  # torch and sklearn load in the worker, not with the config

        train, test = digits.load(cfg.train_fraction)
        self.train = digits.BatchScorer(train)
        self.test = digits.BatchScorer(test)

    def evaluate(self, batch: np.ndarray) -> BatchEvaluation:
        correct = self.train.correct(batch)
        acc = correct.mean(axis=1)
        return BatchEvaluation(fitness=acc, scores=correct, metrics={"train_accuracy": acc})

    def holdout(self, x: np.ndarray) -> dict[str, float]:
        return {"test_accuracy": float(self.test.correct(x).mean())}
