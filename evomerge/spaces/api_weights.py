"""The `api_weights` space: one coefficient per model reachable only through an API.

Setting (a): the models are experts hosted by a server that merges per request (`run.py serve`,
or any provider taking coefficients in the request); setting (b): they are separate API models
whose answers the fitness combines. Either way a point is one signed weight per model (plus, when
searched, one density per model for TIES-like server-side merges); the recipe logs them by name.
Nothing is materialized locally: the best is saved as its recipe.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import Field, model_validator

from .merge_types import Range
from ..schema import Frozen
from .base import SearchSpace


class APIWeightsSpaceConfig(Frozen):
    """One weight (and optionally one density) per API model or hosted expert."""

    name: Literal["api_weights"]
    models: list[str] = Field(min_length=1, description="expert labels (server-side merge) or API model names")
    weight: Range = Field(Range(low=0.0, high=1.0), description="range of each weight (may be signed)")
    density: Range | None = Field(None, description="also search a density per model in this range (TIES-like)")
    start: float | None = Field(None, description="the seed point's weight for every model (default: the centre)")

    @model_validator(mode="after")
    def _unique(self):
        dup = sorted({m for m in self.models if self.models.count(m) > 1})
        if dup:
            raise ValueError(f"models: each at most once; repeated: {', '.join(dup)}")
        if self.density is not None and not (0 < self.density.low <= self.density.high <= 1):
            raise ValueError("density: must lie in (0, 1]")
        return self


class APIWeightsSpace(SearchSpace):
    def __init__(self, cfg: APIWeightsSpaceConfig, seed: int):
        self.cfg = cfg
        self.seed = seed
        self.labels = list(cfg.models)
        n = len(self.labels)
        lows, highs = [cfg.weight.low] * n, [cfg.weight.high] * n
        self.layout = [("all", "weight", m) for m in self.labels]
        if cfg.density is not None:
            lows += [cfg.density.low] * n
            highs += [cfg.density.high] * n
            self.layout += [("all", "density", m) for m in self.labels]
        self.lower, self.upper = np.array(lows, np.float64), np.array(highs, np.float64)
        self.dim = len(self.layout)

    def seeds(self) -> list[np.ndarray]:
        x = (self.lower + self.upper) / 2
        if self.cfg.start is not None:
            x[:len(self.labels)] = np.clip(self.cfg.start, self.cfg.weight.low, self.cfg.weight.high)
        return [x.astype(np.float32)]

    def decode(self, x: np.ndarray) -> dict:
        x = np.clip(np.asarray(x, np.float64), self.lower, self.upper)
        n = len(self.labels)
        recipe = {"method": "api_weights", "weights": {m: round(float(v), 7) for m, v in zip(self.labels, x[:n])}}
        if self.cfg.density is not None:
            recipe["density"] = {m: round(float(v), 7) for m, v in zip(self.labels, x[n:])}
        return recipe

    def recipe(self, x: np.ndarray) -> dict:
        return self.decode(x)

    def describe(self) -> dict:
        return {"dim": self.dim, "models": self.labels,
                "layout": [f"{g}/{p}/{m} [{lo:g}, {hi:g}]"
                           for (g, p, m), lo, hi in zip(self.layout, self.lower, self.upper)]}

    def save(self, x: np.ndarray, directory: Path, info: dict) -> None:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "recipe.json").write_text(json.dumps(self.decode(x), indent=2) + "\n")
        (directory / "info.json").write_text(json.dumps(info, indent=2) + "\n")
