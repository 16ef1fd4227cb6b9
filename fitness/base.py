"""The interface of evaluators: per-example scores plus named metrics, a batch at a time."""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field

import numpy as np


@dataclass
class BatchEvaluation:
    """Scores of a batch of B candidates.

    fitness: (B,) the scalar the search maximises; scores: (B, n_examples) per-example
    scores (what M2N2's competition and per-task reports use); metrics: name -> (B,) values.
    """

    fitness: np.ndarray
    scores: np.ndarray | None
    metrics: dict[str, np.ndarray] = field(default_factory=dict)


class Fitness(ABC):
    """Built once inside each worker (it holds the data and a resident model).

    `spaces` names the search spaces whose points this fitness knows how to score.
    """

    spaces: tuple[str, ...] = ()

    @classmethod
    def objectives(cls, cfg) -> list[str]:
        """Metric names that are separate objectives (per task, higher is better); two or more make
        the run report a Pareto front. Default: none beyond the fitness."""
        return []

    @abstractmethod
    def evaluate(self, batch: np.ndarray) -> BatchEvaluation:
        """Score a batch of points (B, dim) on the search split."""

    @abstractmethod
    def holdout(self, x: np.ndarray) -> dict[str, float]:
        """Metrics of one point on held-out data (reported for the best, never searched on)."""


class ModelFitness(ABC):
    """A fitness that scores a materialized model (e.g. a resident Hugging Face causal LM).

    Built once inside each worker; the worker merges each candidate into its resident model
    in place and then calls `evaluate_model`. Returns per-example scores (1-D, concatenated
    over tasks) and named metrics; `fitness` is the scalar the search maximises.
    """

    spaces: tuple[str, ...] = ()

    @classmethod
    def objectives(cls, cfg) -> list[str]:
        """As Fitness.objectives."""
        return []

    @abstractmethod
    def evaluate_model(self, model, tokenizer) -> tuple[float, np.ndarray, dict[str, float]]:
        """(fitness, per-example scores, metrics) on the search split."""

    @abstractmethod
    def holdout_model(self, model, tokenizer) -> dict[str, float]:
        """Metrics on the held-out split (reported for the best, never searched on)."""

    # A differentiable fitness also defines
    #     def loss_model(self, model, tokenizer) -> torch.Tensor
    # a scalar loss on the search split with its autograd graph (lower is better), which gradient-based
    # oracles (Frank-Wolfe's `oracle: gradient`) differentiate through the resident model.


class RecipeFitness(ABC):
    """A fitness that scores a recipe without materializing anything locally (e.g. through an API that
    merges server-side). The worker decodes each candidate and calls `evaluate_recipe`."""

    spaces: tuple[str, ...] = ()

    @classmethod
    def objectives(cls, cfg) -> list[str]:
        """As Fitness.objectives."""
        return []

    @classmethod
    def check(cls, cfg) -> None:
        """Refuse, in the driver before anything starts, what cannot work (e.g. a missing API key)."""

    @abstractmethod
    def evaluate_recipe(self, recipe: dict) -> tuple[float, np.ndarray, dict[str, float]]:
        """(fitness, per-example scores, metrics) on the search split."""

    @abstractmethod
    def holdout_recipe(self, recipe: dict) -> dict[str, float]:
        """Metrics on the held-out split."""


class StopRun(Exception):
    """Raised by a fitness when the run must stop cleanly (e.g. its API budget is spent): the candidate
    is neither failed nor logged, the engine checkpoints and stops; a resumed run evaluates it."""

