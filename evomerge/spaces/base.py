"""Search spaces: what a strategy's vector means and how the chosen model is saved.

A strategy only sees a bounded (or unbounded) float vector of `dim` numbers and a few seed
points; the space says what that vector is (see spaces/digits.py for the simplest one).
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path

import numpy as np


class SearchSpace(ABC):
    """A vector space the strategies search, with seed points and a way to save a point."""

    dim: int
    lower: np.ndarray | None = None  # per-coordinate bounds, or None when unbounded
    upper: np.ndarray | None = None
    random_seeds: bool = False  # seeds are random initialisations (not trained models)

    @abstractmethod
    def seeds(self) -> list[np.ndarray]:
        """Starting points (float32 vectors of length dim), e.g. the experts to merge."""

    @abstractmethod
    def save(self, x: np.ndarray, directory: Path, info: dict) -> None:
        """Write the model that point x stands for into directory."""

    def describe(self) -> dict:
        return {"dim": self.dim, "bounded": self.lower is not None}

    def prepare(self) -> None:
        """Once-per-run work before the workers start (e.g. writing task vectors); default none."""

    def recipe(self, x: np.ndarray) -> dict | None:
        """The JSON description of point x that evals.jsonl logs (None: the vector is the model)."""
        return None

    def decode(self, x: np.ndarray):
        """What a worker materializes for point x (here: the vector itself)."""
        return x
