"""Random search baseline: uniform in the bounds, or Gaussian around the seeds' mean."""
from __future__ import annotations

from typing import Literal, Sequence

import numpy as np
from pydantic import Field

from evomerge.schema import Frozen

from .base import Candidate, Result, RunContext, SpaceInfo, Strategy, rng_state, set_rng_state


class RandomSearchConfig(Frozen):
    name: Literal["random"]
    sigma: float = Field(0.01, gt=0, description="std around the seeds' mean when the space is unbounded")


class RandomSearch(Strategy):
    generational = False

    def __init__(self, cfg: RandomSearchConfig, space: SpaceInfo, seed: int, run: RunContext):
        super().__init__(cfg, space, seed, run)
        self.space = space
        self.center = np.mean(np.asarray(space.seeds, np.float32), axis=0)
        self.rng = np.random.default_rng(seed)
        self.steps = 0

    def ask(self, n: int) -> list[Candidate]:
        out = []
        for _ in range(n):
            if self.space.lower is not None:
                x = self.rng.uniform(self.space.lower, self.space.upper).astype(np.float32)
            else:
                x = (self.center
                     + self.rng.standard_normal(self.space.dim, dtype=np.float32) * np.float32(self.cfg.sigma))
            out.append(Candidate(x=x, step=self.steps))
            self.steps += 1
        return out

    def tell(self, results: Sequence[Result]) -> None:
        pass  # nothing to learn

    def state_dict(self) -> dict:
        return {"rng": rng_state(self.rng), "steps": self.steps}

    def load_state_dict(self, state: dict) -> None:
        set_rng_state(self.rng, state["rng"])
        self.steps = state["steps"]
