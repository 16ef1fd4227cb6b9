"""Any optimizer of nevergrad's registry (NGOpt, TwoPointsDE, PSO, DiagonalCMA, ...) over the space.

Asynchronous: a candidate is told as soon as its result arrives (nevergrad's ask/tell with
`num_workers` set to the engine's parallelism), so workers never wait for a generation. The
optimizer and the candidates it has handed out are pickled together for checkpoints; an
optimizer that cannot be pickled is refused when the run starts, not when it first checkpoints.
"""
from __future__ import annotations

import difflib
import pickle
import warnings
from typing import Literal, Sequence

import numpy as np
from pydantic import Field

from evomerge.errors import UserError
from evomerge.schema import Frozen

from .base import Candidate, Result, RunContext, SpaceInfo, Strategy


class NevergradConfig(Frozen):
    name: Literal["nevergrad"]
    optimizer: str = Field("NGOpt", description="a name in nevergrad.optimizers.registry")
    budget: int | None = Field(None, ge=1, description="the budget nevergrad plans for (default: budget.max_evals)")
    num_workers: int | None = Field(None, ge=1, description="parallel asks nevergrad plans for "
                                                            "(default: engine workers x queue_depth x batch_size)")
    x0: Literal["seeds_mean", "center"] = Field("seeds_mean", description="initial point (clipped to the bounds)")
    sigma: float = Field(0.1, gt=0, description="initial step size when the space is unbounded")


def _registry():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import nevergrad as ng
    return ng


class Nevergrad(Strategy):
    generational = False

    @classmethod
    def preflight(cls, cfg: NevergradConfig, dim: int) -> None:
        registry = _registry().optimizers.registry
        if cfg.optimizer not in registry:
            close = difflib.get_close_matches(cfg.optimizer, list(registry), n=3)
            hint = f"; did you mean {', '.join(close)}?" if close else "; see nevergrad.optimizers.registry"
            raise UserError(f"strategy.optimizer: {cfg.optimizer!r} is not a nevergrad optimizer{hint}")

    def __init__(self, cfg: NevergradConfig, space: SpaceInfo, seed: int, run: RunContext):
        self.preflight(cfg, space.dim)
        if (cfg.budget or run.max_evals) is None:
            raise UserError("strategy.budget: nevergrad's optimizers plan with a budget; set strategy.budget "
                            "or budget.max_evals")
        ng = _registry()
        super().__init__(cfg, space, seed, run)
        seeds = np.asarray(space.seeds, np.float64)
        bounded = space.lower is not None
        if cfg.x0 == "center" and bounded:
            x0 = (np.asarray(space.lower, np.float64) + np.asarray(space.upper, np.float64)) / 2
        else:
            x0 = seeds.mean(axis=0)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # nevergrad warns about bounds closer than 3 sigma
            if bounded:
                lo, hi = np.asarray(space.lower, np.float64), np.asarray(space.upper, np.float64)
                param = ng.p.Array(init=np.clip(x0, lo, hi)).set_bounds(lo, hi)
            else:
                param = ng.p.Array(init=x0).set_mutation(sigma=cfg.sigma)
            param.random_state = np.random.RandomState(seed)
            opt_cls = ng.optimizers.registry[cfg.optimizer]
            self.opt = opt_cls(parametrization=param, budget=cfg.budget or run.max_evals,
                               num_workers=cfg.num_workers or run.parallelism)
        self.pending: dict[str, object] = {}  # uid -> the parameter handed out, until told
        self.steps = 0
        self.worst: float | None = None
        try:
            pickle.dumps(self.opt)
        except Exception as e:  # noqa: BLE001 - whatever stops pickling stops checkpoints
            raise UserError(f"strategy.optimizer: {cfg.optimizer} cannot be pickled ({type(e).__name__}: {e}), "
                            "so the run could not be checkpointed or resumed; choose another optimizer") from None

    def ask(self, n: int) -> list[Candidate]:
        out = []
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for _ in range(n):
                p = self.opt.ask()
                self.pending[p.uid] = p
                out.append(Candidate(x=np.asarray(p.value, np.float32), step=self.steps, tag=p.uid))
                self.steps += 1
        return out

    def tell(self, results: Sequence[Result]) -> None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for r in results:
                p = self.pending.pop(r.candidate.tag)
                if np.isfinite(r.fitness):
                    loss = -float(r.fitness)  # nevergrad minimises
                    self.worst = loss if self.worst is None else max(self.worst, loss)
                else:  # failed, no penalty configured: worse than anything seen
                    loss = (self.worst if self.worst is not None else 0.0) + 1.0
                self.opt.tell(p, loss)

    def state_dict(self) -> dict:
        # one pickle: the pending parameters stay the very objects the optimizer handed out
        return {"blob": pickle.dumps((self.opt, self.pending, self.steps, self.worst))}

    def load_state_dict(self, state: dict) -> None:
        self.opt, self.pending, self.steps, self.worst = pickle.loads(state["blob"])

    def summary(self) -> dict:
        opt = self.opt
        chosen = getattr(opt, "optim", None)  # NGOpt-style meta-optimizers delegate to one
        return {"optimizer": self.cfg.optimizer, "delegates_to": type(chosen).__name__ if chosen else None,
                "told": int(opt.num_tell)}
