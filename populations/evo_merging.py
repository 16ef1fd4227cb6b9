"""Evo-Merging: black-box merging over a large repository of experts ("Black-box Model Merging for
Language-Model-as-a-Service with Massive Model Repositories"), one coefficient per expert.

Stage 1, sparsity-based denoising by cheap per-expert probes: the base (every weight 0) and each
expert alone at +`probe_weight` (and at -`probe_weight` with `signs: both`) are scored in one batch;
an expert is kept when its better probe beats the base by more than `min_gain` (at most `max_keep`,
best first; at least the single best), so the search space shrinks to the experts that help.
Stage 2, sign-aware scaling: CMA-ES (pycma) over signed weights of the kept experts only, starting
from each kept expert's better probe sign (`x0: probe`), every other weight held at 0.

Works on any space whose layout names one `weight` per expert (api_weights; hf_merge with
task_arithmetic and layer_granularity 0). The kept experts, their probe gains and signs are in
summary.json's strategy section.
"""
from __future__ import annotations

import pickle
from typing import Literal, Sequence

import numpy as np
from pydantic import Field

from evomerge.errors import UserError
from evomerge.schema import Frozen

from .base import Candidate, Result, RunContext, SpaceInfo, Strategy
from .cmaes import Randn


class EvoMergingConfig(Frozen):
    name: Literal["evo_merging"]
    probe_weight: float | None = Field(None, gt=0, description="|weight| of an expert's probe (default: half "
                                                               "the largest |bound|)")
    signs: Literal["both", "positive"] = Field("both", description="probe each expert at +w and -w, or +w only")
    min_gain: float = Field(0.0, description="keep an expert whose better probe beats the base by more than this")
    max_keep: int | None = Field(None, ge=1, description="keep at most this many experts (best probes first)")
    popsize: int | None = Field(None, ge=2, description="stage-2 CMA-ES population (pycma's default)")
    sigma0: float = Field(0.3, gt=0, description="stage-2 CMA-ES initial step size")
    x0: Literal["probe", "zero"] = Field("probe", description="stage-2 start: each kept expert at its better "
                                                              "probe's signed weight, or all 0")


class EvoMerging(Strategy):
    generational = True

    def __init__(self, cfg: EvoMergingConfig, space: SpaceInfo, seed: int, run: RunContext):
        if space.layout is None or space.lower is None:
            raise UserError("strategy.name: evo_merging needs a space with one weight per expert (api_weights, "
                            "or hf_merge with method task_arithmetic and layer_granularity 0)")
        self.coord: dict[str, int] = {}
        for i, (group, param, expert) in enumerate(space.layout):
            if param == "weight":
                if expert in self.coord:
                    raise UserError("strategy.name: evo_merging searches one weight per expert; this space has "
                                    "several per expert (set layer_granularity: 0)")
                self.coord[expert] = i
        if not self.coord:
            raise UserError("strategy.name: evo_merging needs a searched `weight` per expert")
        super().__init__(cfg, space, seed, run)
        self.seed = seed
        self.lower, self.upper = np.asarray(space.lower, np.float64), np.asarray(space.upper, np.float64)
        self.experts = list(self.coord)
        self.base = (self.lower + self.upper) / 2  # what evo_merging does not search (e.g. densities)
        idx = list(self.coord.values())
        self.base[idx] = np.clip(0.0, self.lower[idx], self.upper[idx])
        bound = float(np.max(np.abs(np.concatenate([self.lower[idx], self.upper[idx]]))))
        self.w = cfg.probe_weight if cfg.probe_weight is not None else bound / 2
        self.probes: list[tuple[str | None, float]] = [(None, 0.0)] + [
            (e, s * self.w) for e in self.experts for s in ((1, -1) if cfg.signs == "both" else (1,))]
        self.probe_fit: list[float | None] = [None] * len(self.probes)
        self.sent = 0
        self.kept: list[str] | None = None
        self.gains: dict[str, float] = {}
        self.signs: dict[str, int] = {}
        self.es = None
        self.generation: list[np.ndarray] = []
        self.gen_fit: list[float | None] = []
        self.gen_sent = 0

    def _point(self, weights: dict[str, float]) -> np.ndarray:
        x = self.base.copy()
        for e, v in weights.items():
            i = self.coord[e]
            x[i] = np.clip(v, self.lower[i], self.upper[i])
        return x.astype(np.float32)

    # stage 1 -----------------------------------------------------------------------------------
    def _decide(self) -> None:
        fit = np.array([f if f is not None and np.isfinite(f) else -np.inf for f in self.probe_fit])
        base = fit[0]
        best: dict[str, tuple[float, int]] = {}
        for (e, v), f in zip(self.probes[1:], fit[1:]):
            if e not in best or f > best[e][0]:
                best[e] = (f, 1 if v > 0 else -1)
        self.gains = {e: float(f - base) if np.isfinite(f) and np.isfinite(base) else float("-inf")
                      for e, (f, _) in best.items()}
        self.signs = {e: s for e, (_, s) in best.items()}
        order = sorted(self.experts, key=lambda e: -self.gains[e])
        kept = [e for e in order if self.gains[e] > self.cfg.min_gain]
        if self.cfg.max_keep is not None:
            kept = kept[:self.cfg.max_keep]
        self.kept = kept or order[:1]
        self._start_cma()

    def _start_cma(self) -> None:
        import cma

        idx = [self.coord[e] for e in self.kept]
        lo, hi = self.lower[idx], self.upper[idx]
        if self.cfg.x0 == "probe":
            x0 = np.array([self.signs[e] * self.w for e in self.kept])
        else:
            x0 = np.zeros(len(idx))
        x0 = np.clip(x0, lo + 1e-9 * (hi - lo), hi - 1e-9 * (hi - lo))
        opts = {"bounds": [list(lo), list(hi)], "seed": int(self.seed) + 1, "verbose": -9,
                "randn": Randn(int(self.seed) + 1)}  # sampling state in es (pickled), not numpy's global
        if self.cfg.popsize:
            opts["popsize"] = self.cfg.popsize
        if len(idx) == 1:  # pycma needs two dimensions: a dummy coordinate, ignored
            x0, opts["bounds"] = np.append(x0, 0.0), [list(lo) + [-1.0], list(hi) + [1.0]]
        self.es = cma.CMAEvolutionStrategy(list(x0), self.cfg.sigma0, opts)

    # ask / tell ----------------------------------------------------------------------------------
    def ask(self, n: int) -> list[Candidate]:
        if self.kept is None:
            k = min(n, len(self.probes) - self.sent)
            out = []
            for i in range(self.sent, self.sent + k):
                e, v = self.probes[i]
                out.append(Candidate(x=self._point({} if e is None else {e: v}), step=i, tag=("probe", i)))
            self.sent += k
            return out
        if not self.generation:
            self.generation = [np.asarray(s, np.float64) for s in self.es.ask()]
            self.gen_fit, self.gen_sent = [None] * len(self.generation), 0
        k = min(n, len(self.generation) - self.gen_sent)
        out = []
        for i in range(self.gen_sent, self.gen_sent + k):
            weights = dict(zip(self.kept, self.generation[i][:len(self.kept)]))
            out.append(Candidate(x=self._point(weights), step=len(self.probes) + i, tag=("cma", i)))
        self.gen_sent += k
        return out

    def tell(self, results: Sequence[Result]) -> None:
        for r in results:
            stage, i = r.candidate.tag
            f = r.fitness if np.isfinite(r.fitness) else None
            if stage == "probe":
                self.probe_fit[i] = f if f is not None else -np.inf
            else:
                self.gen_fit[i] = -f if f is not None else float("inf")  # pycma minimises
        if self.kept is None and all(f is not None for f in self.probe_fit):
            self._decide()
        elif self.generation and all(f is not None for f in self.gen_fit):
            self.es.tell(self.generation, self.gen_fit)
            self.generation, self.gen_fit, self.gen_sent = [], [], 0

    def state_dict(self) -> dict:
        return {"probe_fit": list(self.probe_fit), "sent": self.sent, "kept": self.kept, "gains": dict(self.gains),
                "signs": dict(self.signs), "es": None if self.es is None else pickle.dumps(self.es),
                "generation": [g.copy() for g in self.generation], "gen_fit": list(self.gen_fit),
                "gen_sent": self.gen_sent}

    def load_state_dict(self, state: dict) -> None:
        self.probe_fit, self.sent, self.kept = list(state["probe_fit"]), state["sent"], state["kept"]
        self.gains, self.signs = dict(state["gains"]), dict(state["signs"])
        self.es = None if state["es"] is None else pickle.loads(state["es"])
        self.generation = [np.array(g) for g in state["generation"]]
        self.gen_fit, self.gen_sent = list(state["gen_fit"]), state["gen_sent"]

    def stats(self) -> dict[str, float]:
        """stage (1: probes, 2: CMA-ES over the kept experts), experts kept, and in stage 2 CMA-ES's
        sigma, generation and last generation's fitness."""
        out = {"stage": 1.0 if self.es is None else 2.0}
        if self.kept is not None:
            out["kept"] = float(len(self.kept))
        if self.es is not None:
            from .cmaes import cma_stats

            out.update(cma_stats(self.es))
        return out

    def summary(self) -> dict:
        out = {"probe_weight": self.w, "experts": len(self.experts)}
        if self.kept is not None:
            out.update(kept=self.kept, probe_gain={e: round(g, 6) for e, g in self.gains.items()},
                       sign={e: self.signs[e] for e in self.kept})
            if self.es is not None and self.es.result.xbest is not None:
                out["cma_best_weights"] = {e: round(float(v), 6) for e, v in zip(self.kept, self.es.result.xbest)}
        return out
