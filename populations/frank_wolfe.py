"""Frank-Wolfe selection over a pool of models (FW-Merging, "Scaling Model Merging with Frank-Wolfe
Optimization"), with a black-box or a gradient linear minimization oracle.

The iterate theta holds the merge coefficients (`param`, e.g. each expert's task-arithmetic weight,
per layer group); theta_{t+1} = (1 - gamma_t) theta_t + gamma_t s_t with gamma_t = step * 2 / (t + 2).
The atoms s are "expert k at weight `scale`, every other expert at 0": task-wise one atom for the
whole model, layer-wise one per layer group. The oracle evaluates the candidate moves in parallel
(one per pool model, or per group and model: a whole step is one batch for the engine) and picks the
best (as in Frank-Wolfe, the iterate moves toward the best atom even when no move improves on it;
the step size shrinks as 2/(t+2), so a late unhelpful move is small). Workers map the experts' task vectors
(memory does not grow with the pool); the strategy holds only the coefficient vector.

With `oracle: gradient` (a differentiable fitness, e.g. lm_tasks' answer NLL, and a merge linear in
the weights: task_arithmetic or linear) each step is one evaluation: the worker scores theta_t and
back-propagates the loss once, returning d loss / d weight for every group and expert (the inner
product of the parameter gradient with each task vector); the oracle picks, for the whole model or
per group, the expert whose atom minimises <gradient, s>, i.e. the task vector best aligned with the
negative gradient. The Frank-Wolfe gap <gradient, theta - s> is logged per step.
"""
from __future__ import annotations

from typing import Literal, Sequence

import numpy as np
from pydantic import Field

from evomerge.errors import UserError
from evomerge.schema import Frozen

from .base import Candidate, Result, RunContext, SpaceInfo, Strategy


class FrankWolfeConfig(Frozen):
    name: Literal["frank_wolfe"]
    mode: Literal["taskwise", "layerwise"] = Field("taskwise",
                                                   description="one atom per model, or per layer group and model")
    steps: int = Field(10, ge=1, description="Frank-Wolfe iterations")
    step: float = Field(1.0, gt=0, le=1, description="gamma_t = step * 2 / (t + 2)")
    param: str = Field("weight", description="the merge parameter the iterate holds")
    scale: float | None = Field(None, gt=0, description="an atom's value of `param` (default: its upper bound)")
    start: Literal["zero", "center"] = Field("zero", description="theta_0: every coefficient 0 (the base model) "
                                                                 "or the centre of the bounds")
    oracle: Literal["black_box", "gradient"] = Field(
        "black_box", description="black_box: score one move per model (per group and model) and keep the best; "
                                 "gradient: one evaluation per step, the atom best aligned with the negative "
                                 "gradient of the fitness's loss (needs param: weight)")


class FrankWolfe(Strategy):
    generational = True

    def __init__(self, cfg: FrankWolfeConfig, space: SpaceInfo, seed: int, run: RunContext):
        if space.layout is None or space.lower is None:
            raise UserError("strategy.name: frank_wolfe needs a merge space (space.name: hf_merge)")
        mine = [i for i, (_, p, _) in enumerate(space.layout) if p == cfg.param]
        if not mine:
            raise UserError(f"strategy.param: {cfg.param!r} is not searched by the space "
                            f"(searched: {sorted({p for _, p, _ in space.layout})})")
        if cfg.oracle == "gradient" and cfg.param != "weight":
            raise UserError(f"strategy.param: {cfg.param}: the gradient oracle moves the merge weights (param: weight)")
        super().__init__(cfg, space, seed, run)
        self.lower = np.asarray(space.lower, np.float64)
        self.upper = np.asarray(space.upper, np.float64)
        self.coords = np.array(mine)
        self.experts = sorted({space.layout[i][2] for i in mine}, key=[e for _, _, e in space.layout].index)
        self.groups = sorted({space.layout[i][0] for i in mine}, key=[g for g, _, _ in space.layout].index)
        self.of_expert = {e: np.array([i for i in mine if space.layout[i][2] == e]) for e in self.experts}
        self.of_cell = {(g, e): np.array([i for i in mine if space.layout[i][0] == g and space.layout[i][2] == e])
                        for g in self.groups for e in self.experts}
        self.scale = cfg.scale if cfg.scale is not None else float(self.upper[self.coords].max())
        theta = (self.lower + self.upper) / 2  # parameters FW does not move stay at the centre
        if cfg.start == "zero":
            theta[self.coords] = 0.0
        self.theta = np.clip(theta, self.lower, self.upper)
        self.t = 0
        self.step_cands: list[tuple[str, np.ndarray]] = []  # (label, x) of the current step
        self.step_fit: list[float | None] = []
        self.sent = 0
        self.steps_done = 0
        self.history: list[dict] = []
        self.anchor_pending = True  # theta_0 is scored with the first step
        self.finished = False  # gradient oracle: the last iterate is scored
        self.gamma: float | None = None  # the current step's size (None before the first step)

    @classmethod
    def extra_metrics(cls, cfg: FrankWolfeConfig) -> tuple[str, ...]:
        return ("weight_gradient",) if cfg.oracle == "gradient" else ()

    def _group_coords(self, g: str) -> np.ndarray:
        return np.concatenate([self.of_cell[(g, e)] for e in self.experts])

    def _atom_move(self, region: np.ndarray, cells: np.ndarray, gamma: float) -> np.ndarray:
        """theta with the `param` coefficients in `region` moved toward the atom that puts `scale`
        on `cells` (one expert) and 0 on the rest of the region."""
        y = self.theta.copy()
        atom = np.zeros(len(y))
        atom[cells] = self.scale
        y[region] = (1 - gamma) * y[region] + gamma * atom[region]
        return np.clip(y, self.lower, self.upper)

    def _make_step(self) -> None:
        gamma = self.cfg.step * 2.0 / (self.t + 2)
        if self.cfg.oracle == "gradient":  # one evaluation per step: theta_t with its gradient
            self.step_cands, self.step_fit, self.sent, self.gamma = [("theta", self.theta.copy())], [None], 0, gamma
            return
        cands: list[tuple[str, np.ndarray]] = []
        if self.anchor_pending:
            cands.append(("theta", self.theta.copy()))
        if self.t < self.cfg.steps:  # else: only the last layer-wise iterate, to be scored
            if self.cfg.mode == "taskwise":
                for e in self.experts:
                    cands.append((e, self._atom_move(self.coords, self.of_expert[e], gamma)))
            else:
                for g in self.groups:
                    for e in self.experts:
                        cands.append((f"{g}:{e}", self._atom_move(self._group_coords(g), self.of_cell[(g, e)], gamma)))
        self.step_cands, self.step_fit, self.sent, self.gamma = cands, [None] * len(cands), 0, gamma

    def ask(self, n: int) -> list[Candidate]:
        if self.done:
            return []
        if not self.step_cands:
            self._make_step()
        k = min(n, len(self.step_cands) - self.sent)
        out = [Candidate(x=self.step_cands[i][1].astype(np.float32), step=self.t, tag=i)
               for i in range(self.sent, self.sent + k)]
        self.sent += k
        return out

    def tell(self, results: Sequence[Result]) -> None:
        if self.cfg.oracle == "gradient":
            for r in results:
                self._gradient_step(r)
            return
        for r in results:
            self.step_fit[r.candidate.tag] = r.fitness if np.isfinite(r.fitness) else -np.inf
        if not self.step_cands or any(f is None for f in self.step_fit):
            return
        labels = [label for label, _ in self.step_cands]
        fit = np.array(self.step_fit, np.float64)
        moves = [i for i, label in enumerate(labels) if label != "theta"]
        self.anchor_pending = False
        if not moves:  # the final layer-wise iterate has its score
            self.step_cands, self.step_fit, self.sent = [], [], 0
            return
        if self.cfg.mode == "taskwise":
            best = max(moves, key=lambda i: fit[i])
            chosen = [labels[best]]
            self.theta = self.step_cands[best][1].copy()
        else:  # per group, the model whose move scored best; all groups move together
            chosen, theta = [], self.theta.copy()
            for g in self.groups:
                idx = [i for i in moves if labels[i].startswith(f"{g}:")]
                best = max(idx, key=lambda i: fit[i])
                chosen.append(labels[best])
                region = self._group_coords(g)
                theta[region] = self.step_cands[best][1][region]
            self.theta = theta
            self.anchor_pending = True  # the combined iterate is scored with the next step
        self.history.append({"t": self.t, "gamma": round(self.gamma, 6), "chosen": chosen,
                             "best_move_fitness": float(fit[moves].max())})
        self.t += 1
        self.step_cands, self.step_fit, self.sent = [], [], 0

    def _gradient_step(self, r: Result) -> None:
        self.step_cands, self.step_fit, self.sent = [], [], 0
        if self.t >= self.cfg.steps:
            self.finished = True
            return
        grad = np.zeros(len(self.theta))
        missing = []
        for g in self.groups:
            for e in self.experts:
                v = r.metrics.get(f"dloss/{g}/{e}")
                if v is None or not np.isfinite(v):
                    missing.append(f"{g}/{e}")
                else:
                    grad[self.of_cell[(g, e)]] = v
        entry = {"t": self.t, "gamma": round(self.gamma, 6), "fitness": float(r.fitness),
                 "loss": r.metrics.get("loss")}
        if r.failed or missing:  # no gradient: theta stays, the step counts
            entry["chosen"] = []
        else:
            if self.cfg.mode == "taskwise":
                # <grad, atom_e> = scale * sum of e's coordinates: the best-aligned expert minimises it
                best = min(self.experts, key=lambda e: grad[self.of_expert[e]].sum())
                y, chosen = self._atom_move(self.coords, self.of_expert[best], self.gamma), [best]
                atom = np.zeros(len(y))
                atom[self.of_expert[best]] = self.scale
            else:
                y, chosen, atom = self.theta.copy(), [], np.zeros(len(self.theta))
                for g in self.groups:
                    best = min(self.experts, key=lambda e: grad[self.of_cell[(g, e)]].sum())
                    region = self._group_coords(g)
                    y[region] = self._atom_move(region, self.of_cell[(g, best)], self.gamma)[region]
                    atom[self.of_cell[(g, best)]] = self.scale
                    chosen.append(f"{g}:{best}")
            entry["chosen"] = chosen
            entry["gap"] = float(grad[self.coords] @ (self.theta[self.coords] - atom[self.coords]))
            self.theta = y
        self.history.append(entry)
        self.t += 1

    @property
    def done(self) -> bool:
        if self.cfg.oracle == "gradient":
            return self.finished
        return self.t >= self.cfg.steps and not self.anchor_pending and not self.step_cands

    def state_dict(self) -> dict:
        return {"theta": self.theta.copy(), "t": self.t, "step_cands": [(lbl, x.copy()) for lbl, x in self.step_cands],
                "step_fit": list(self.step_fit), "sent": self.sent, "history": list(self.history),
                "anchor_pending": self.anchor_pending, "gamma": self.gamma,
                "finished": self.finished}

    def load_state_dict(self, state: dict) -> None:
        self.theta = np.array(state["theta"])
        self.t = state["t"]
        self.step_cands = [(lbl, np.array(x)) for lbl, x in state["step_cands"]]
        self.step_fit = list(state["step_fit"])
        self.sent = state["sent"]
        self.history = list(state["history"])
        self.anchor_pending = state["anchor_pending"]
        self.gamma = state["gamma"]
        self.finished = state.get("finished", False)

    def stats(self) -> dict[str, float]:
        """Iterations done, the last step size gamma, and the last step's best move fitness (black box)
        or Frank-Wolfe gap <gradient, theta - s> (gradient oracle)."""
        out = {"iteration": float(self.t)}
        if self.history:
            last = self.history[-1]
            out["gamma"] = float(last["gamma"])
            for key in ("best_move_fitness", "gap", "loss"):
                if isinstance(last.get(key), (int, float)):
                    out[key] = float(last[key])
        return out

    def summary(self) -> dict:
        weights = {e: round(float(np.mean(self.theta[self.of_expert[e]])), 4) for e in self.experts}
        return {"iterations": self.t, "oracle": self.cfg.oracle, "chosen": [h["chosen"] for h in self.history],
                "final_mean_weight": weights, "history": self.history}
