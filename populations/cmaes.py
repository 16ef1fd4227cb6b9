"""CMA-ES through pycma: full covariance, or separable (`diagonal: true`, linear time and memory)."""
from __future__ import annotations

import pickle
import warnings
from typing import Any, Literal, Sequence

import numpy as np
import psutil
from pydantic import Field

from evomerge.errors import UserError
from evomerge.schema import Frozen

from .base import Candidate, Result, RunContext, SpaceInfo, Strategy

# Peak bytes of full-covariance pycma per dim^2: C, its eigenbasis B, and LAPACK's copy and
# workspace in the eigendecomposition, in float64 (measured: bench/cma_memory.py).
FULL_COV_BYTES_PER_DIM2 = 4 * 8


class CMAESConfig(Frozen):
    name: Literal["cmaes"]
    popsize: int | None = Field(None, ge=2, description="lambda; default pycma's 4 + 3 ln(dim)")
    sigma0: float = Field(0.1, gt=0, description="initial step size")
    x0: Literal["seeds_mean", "first_seed", "center", "zeros"] = Field(
        "seeds_mean", description="initial mean: mean or first of the space's seeds, centre of the bounds, or 0")
    diagonal: bool = Field(False, description="separable CMA-ES: diagonal covariance, linear memory")
    bounds: tuple[float, float] | None = Field(None, description="[low, high] for every coordinate; "
                                                                 "default the space's")
    respect_stop: bool = Field(False, description="end the run when pycma's termination criteria fire")
    options: dict[str, Any] = Field(default_factory=dict, description="extra pycma options")


class Randn:
    """pycma's `randn` option backed by a numpy Generator, so the sampling state pickles with es."""

    def __init__(self, seed: int):
        self.rng = np.random.default_rng(seed)

    def __call__(self, *shape: int) -> np.ndarray:
        return self.rng.standard_normal(shape)


def full_covariance_bytes(dim: int) -> int:
    return FULL_COV_BYTES_PER_DIM2 * dim * dim


class CMAES(Strategy):
    generational = True

    @classmethod
    def preflight(cls, cfg: CMAESConfig, dim: int) -> None:
        if not cfg.diagonal:
            need, have = full_covariance_bytes(dim), psutil.virtual_memory().available
            if need > have // 2:
                raise UserError(
                    f"strategy.diagonal: full-covariance CMA-ES in {dim} dimensions needs about "
                    f"{need / 2**30:.1f} GiB, more than half of the {have / 2**30:.1f} GiB available; "
                    "set strategy.diagonal: true (separable CMA-ES, linear memory)")

    def __init__(self, cfg: CMAESConfig, space: SpaceInfo, seed: int, run: RunContext):
        super().__init__(cfg, space, seed, run)
        dim = space.dim
        self.preflight(cfg, dim)
        lower, upper = space.lower, space.upper
        if cfg.bounds is not None:
            lower, upper = np.full(dim, cfg.bounds[0]), np.full(dim, cfg.bounds[1])
        seeds = np.asarray(space.seeds, np.float64)
        if cfg.x0 == "seeds_mean":
            x0 = seeds.mean(axis=0)
        elif cfg.x0 == "first_seed":
            x0 = seeds[0].copy()
        elif cfg.x0 == "center":
            if lower is None:
                raise UserError("strategy.x0: 'center' needs bounds (strategy.bounds or a bounded space)")
            x0 = (np.asarray(lower) + np.asarray(upper)) / 2
        else:
            x0 = np.zeros(dim)
        if lower is not None and (np.any(x0 < lower) or np.any(x0 > upper)):
            raise UserError(f"strategy.x0: the initial mean ({cfg.x0}) lies outside the bounds; "
                            "choose x0: center or wider bounds")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # pycma warns when matplotlib is missing; plots are unused
            import cma  # imported here: it pulls in scipy.stats, seconds of start-up for other strategies

        opts = {"seed": seed, "randn": Randn(seed), "verbose": -9, "verb_log": 0, "verb_disp": 0}
        if cfg.popsize:
            opts["popsize"] = cfg.popsize
        if cfg.diagonal:
            opts["CMA_diagonal"] = True
        if lower is not None:
            opts["bounds"] = [list(np.asarray(lower, float)), list(np.asarray(upper, float))]
        opts.update(cfg.options)
        try:
            self.es = cma.CMAEvolutionStrategy(x0, cfg.sigma0, opts)
        except ValueError as e:
            raise UserError(f"strategy.options: pycma refused the options: {e}") from None
        self.popsize = self.es.popsize
        self.generation: list[np.ndarray] = []  # the generation being evaluated, as pycma asked it
        self.fitness: list[float | None] = []
        self.sent = 0

    def ask(self, n: int) -> list[Candidate]:
        if not self.generation:
            self.generation = self.es.ask()
            self.fitness = [None] * len(self.generation)
            self.sent = 0
        k = min(n, len(self.generation) - self.sent)
        out = [Candidate(x=self.generation[i].astype(np.float32), step=self.es.countiter, tag=i)
               for i in range(self.sent, self.sent + k)]
        self.sent += k
        return out

    def tell(self, results: Sequence[Result]) -> None:
        for r in results:
            # pycma minimises; a failed candidate gets the engine's penalty, or the worst value
            self.fitness[r.candidate.tag] = -r.fitness if np.isfinite(r.fitness) else float("inf")
        if self.generation and all(f is not None for f in self.fitness):
            self.es.tell(self.generation, self.fitness)
            self.generation, self.fitness, self.sent = [], [], 0

    @property
    def done(self) -> bool:
        return self.cfg.respect_stop and bool(self.es.stop())

    def state_dict(self) -> dict:
        return {"es": pickle.dumps(self.es), "generation": [g.copy() for g in self.generation],
                "fitness": list(self.fitness), "sent": self.sent}

    def load_state_dict(self, state: dict) -> None:
        self.es = pickle.loads(state["es"])
        self.generation = [np.array(g) for g in state["generation"]]
        self.fitness = list(state["fitness"])
        self.sent = state["sent"]

    def summary(self) -> dict:
        return {"generations": int(self.es.countiter), "sigma": float(self.es.sigma), "popsize": self.popsize}

    def stats(self) -> dict[str, float]:
        return cma_stats(self.es)


def cma_stats(es) -> dict[str, float]:
    """sigma, the mean coordinate std (sigma x sqrt(diag C)), generations told, and the fitness of the
    last told generation (best and median; fitness = -pycma's f, higher is better)."""
    out = {"sigma": float(es.sigma), "std_mean": float(np.mean(es.stds)), "generation": float(es.countiter)}
    f = np.asarray(getattr(es.fit, "fit", []), np.float64)
    f = f[np.isfinite(f)]
    if es.countiter and f.size:
        out.update(generation_best=float(-f.min()), generation_median=float(-np.median(f)))
    return out
