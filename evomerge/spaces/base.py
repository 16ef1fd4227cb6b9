"""Search spaces: what a strategy's vector means and how the chosen model is saved.

A strategy only sees a bounded (or unbounded) float vector of `dim` numbers and a few seed
points; the space says what that vector is (see spaces/digits.py for the simplest one).
Every hook a caller may use is declared here, with what a space without it does.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ..errors import UserError

if TYPE_CHECKING:
    from ..memplan import Plan
    from ..schema import Frozen


class SearchSpace(ABC):
    """A vector space the strategies search, with seed points and a way to save a point.

    `cfg` is the space's config (its `name` is the registry's); `layout`, in merge spaces, says what
    each coordinate is: (group, parameter, expert) per coordinate; `gram`, in mixture spaces
    (hf_mixture), the seeds' inner products per cell, (cells, S, S), once `prepare` ran; `gpu_share`,
    the share of its GPU a worker's runtime may plan for (engine.gpus_per_worker below 1).
    """

    cfg: Frozen
    dim: int
    lower: np.ndarray | None = None  # per-coordinate bounds, or None when unbounded
    upper: np.ndarray | None = None
    random_seeds: bool = False  # seeds are random initialisations (not trained models)
    layout: list[tuple[str, str, str]] | None = None
    gram: np.ndarray | None = None
    gpu_share: float = 1.0

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

    def open_runtime(self, device: str | None = None):
        """The resident model a worker merges each candidate into (on `device`; None: its own), for a
        fitness of input "model". A vector space has none."""
        raise NotImplementedError(f"space {self.cfg.name}: a vector space has no runtime (its points are scored "
                                  "as vectors)")

    def check_weight_gradient(self) -> None:
        """Refuse, before anything starts, a space whose merge the gradient oracles cannot differentiate."""
        raise UserError(f"space.name: {self.cfg.name}: gradient oracles need a merge space (hf_merge)")

    def mergekit_config(self, recipe: dict) -> dict:
        """A mergekit YAML (as a dict) that reproduces the recipe's model with `mergekit-yaml`."""
        raise UserError(f"--mergekit: space {self.cfg.name} has no mergekit form")

    @classmethod
    def memory_plan(cls, cfg, workers_per_node: int, gpu_share: float = 1.0,
                    measure_h2d: bool = True) -> Plan | None:
        """How a worker's runtime of this space would use memory (the CLI prints it, the engine
        checks it), for `workers_per_node` workers sharing a node, each with `gpu_share` of its GPU;
        `measure_h2d`: time a host-to-device copy for the plan's estimates. None: no plan (nothing
        resident worth planning)."""
        return None
