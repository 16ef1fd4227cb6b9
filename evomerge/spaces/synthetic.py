"""A synthetic search space for engine tests and benchmarks: a box of `dim` numbers, random seeds.

Paired with fitness `synthetic` (fitness/synthetic.py), whose cost, failures and crashes are set in
the config, it exercises the engine (scheduling, failures, resume) without a model in the way.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import Field

from ..schema import Frozen
from .base import SearchSpace


class SyntheticSpaceConfig(Frozen):
    name: Literal["synthetic"]
    dim: int = Field(8, ge=1, description="length of the vector searched")
    n_seeds: int = Field(4, ge=1, description="random seed points, uniform in the box")
    bound: float = Field(1.0, gt=0, description="the box is [-bound, bound]^dim")


class SyntheticSpace(SearchSpace):
    random_seeds = True

    def __init__(self, cfg: SyntheticSpaceConfig, seed: int):
        self.cfg = cfg
        self.seed = seed
        self.dim = cfg.dim
        self.lower = np.full(cfg.dim, -cfg.bound, np.float32)
        self.upper = np.full(cfg.dim, cfg.bound, np.float32)

    def seeds(self) -> list[np.ndarray]:
        rng = np.random.default_rng([self.seed, 2])
        return [rng.uniform(self.lower, self.upper).astype(np.float32) for _ in range(self.cfg.n_seeds)]

    def recipe(self, x: np.ndarray) -> dict:
        return {"x": [float(v) for v in np.asarray(x, np.float32)]}

    def save(self, x: np.ndarray, directory: Path, info: dict) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "point.json").write_text(json.dumps({**self.recipe(x), "info": info}, indent=2) + "\n")
