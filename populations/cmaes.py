"""CMA-ES through pycma: full covariance, or separable (`diagonal: true`, linear time and memory).

Overlapping generations (`overlap`, on by default). Plain generational CMA-ES sends a generation, then
waits for its slowest candidate before pycma is told and samples the next one: with evaluation times
that vary (log-normal, sigma 1) and popsize = workers, workers are busy about a third of the time. With
`overlap: k`, once every candidate of the sampled generations is sent and workers ask for more, the next
generation is sampled at once (pycma's `es.ask()`, from the current search distribution), as long as at
most k + 1 generations are untold. Each generation is told to pycma whole, as one iteration, as soon as
all its candidates are scored, so a slow candidate holds back only its own generation (telling strictly
in order was measured worse: the slowest candidate then blocks the generations behind it, and more must
be sampled ahead, staler, for the same utilization). pycma sees exactly the solutions it sampled, popsize
at a time. `overlap: 0` is generational CMA-ES exactly (the same calls to pycma in the same order as
before the option existed). A candidate's `cohort` is its generation's number (in the order sampled) and
`cohort_size` the popsize.

Effect on the search: a generation sampled ahead was drawn from the distribution before the updates of
the generations told in the meantime, and pycma's `tell` treats it as drawn from the current one. pycma
keeps the genotype of every solution it sampled (its `sent_solutions` archive), so nothing is repaired
or clipped; the new mean is the weighted mean of the selected solutions (absolute points, valid wherever
they were drawn), while the evolution paths and the rank-mu covariance update measure steps from the
current mean, so a stale generation adds the difference of the two means to each step: the mean lags and
step-size control is noisier (pycma's author on the risk, pycma issue #147). To keep samples fresh, what
is not sent yet of an outstanding generation is drawn again after each tell. Translating stale solutions
to the current mean before telling (a delayed-gradient update) was tried and overshoots (worse).
pycma's `inject` is not used: it is for proposals not yet evaluated (they take slots of the next `ask`,
and their negative weights are zeroed), not for evaluated samples. pycma's selective mirrors (its default
below popsize 6) are turned off when overlapping, and TPA step-size adaptation is refused: both assume
the next iteration told is the one sampled next.
The price, measured in process (bench/cmaes_overlap.py --only simulated: the engine's scheduling simulated
with log-normal times, 8 workers, queue_depth 2, popsize 8, 16 dimensions, 2,000 evaluations, 6 seeds' medians;
generational -> the default overlap 3): utilization 32% -> 84% (2.6x the evaluations per second), and at
equal evaluations a lag of a few generations: sphere 5e-10 -> 8e-6, Rosenbrock 11.8 -> 13.9, ellipsoid
96 -> 161 (distance to the optimum; lower is better), the synthetic fitness equal to 8 digits. At
equal wall time overlap is ahead (generational makes ~770 evaluations in that time, far short of those
values). `overlap: 0` when evaluations, not time, are the budget and precise convergence matters.
With the engine (bench/cmaes_overlap.py, 3 seeds, measured on a loaded 2-core machine): the synthetic
fitness (popsize 8, 8 workers, queue_depth 2, 2,000 evaluations, default overlap 3): utilization 31% -> 80%,
29 -> 74 evaluations/s, best 0.711634 in both (equal to 6 digits); configs/tinylm_ties_cmaes.yaml (popsize
12, 2 workers x batch 3, 720 evaluations, default overlap 1): utilization 94% -> 99%, best fitness 0.870 ->
0.873, held-out mean accuracy 0.792 -> 0.788 (within the seeds' spread, 0.787-0.795).
The default k is ceil(1.5 x parallelism / popsize) (parallelism: candidates the engine keeps outstanding,
workers x queue_depth x batch_size), at least 1: the generations the engine's outstanding candidates span,
and half as many again for the stragglers and what is queued behind them (ceil(parallelism / popsize)
left CMA-ES popsize 8 on 8 workers with queue_depth 2 at 68%); no more, since each further one is staler.
`GenerationPipeline` is the piece, reusable by any strategy that drives a pycma instance.
"""
from __future__ import annotations

import math
import pickle
import warnings
from dataclasses import dataclass, field
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
    overlap: int | None = Field(
        None, ge=0, description="generations sampled ahead, from the current distribution, while earlier ones "
                                "finish, so workers do not wait for a generation's slowest candidate; each is told "
                                "to pycma whole once complete (its samples may be a few updates old: a slight lag "
                                "of the search per evaluation, see populations/cmaes.py). 0: generational CMA-ES "
                                "(workers idle behind each generation); default ceil(1.5 x parallelism / popsize), "
                                "or 0 where pycma adapts the step size by TPA")
    options: dict[str, Any] = Field(default_factory=dict, description="extra pycma options")


class Randn:
    """pycma's `randn` option backed by a numpy Generator, so the sampling state pickles with es."""

    def __init__(self, seed: int):
        self.rng = np.random.default_rng(seed)

    def __call__(self, *shape: int) -> np.ndarray:
        return self.rng.standard_normal(shape)


def full_covariance_bytes(dim: int) -> int:
    return FULL_COV_BYTES_PER_DIM2 * dim * dim


def default_overlap(parallelism: int, popsize: int) -> int:
    """Generations to sample ahead: the engine's outstanding candidates span parallelism / popsize
    generations, and half as many again absorb the stragglers (and candidates queued behind them on a
    worker, queue_depth > 1); at least 1. Measured: bench/cmaes_overlap.py, populations/cmaes.py."""
    return max(1, math.ceil(1.5 * parallelism / popsize))


def fit_for_overlap(es, x0, sigma0: float, opts: dict, ahead: int, keep_mirrors: bool = False,
                    explicit: bool = True):
    """(es, ahead): `es` (built from x0, sigma0, opts), made fit for `ahead` generations sampled ahead: with
    ahead > 0, pycma's selective mirrors (its default below popsize 6) belong in the iteration told next,
    which overlapping generations cannot promise, so es is built again without them (unless keep_mirrors:
    the options ask for them). TPA step-size adaptation (pycma's choice e.g. for separable CMA-ES in many
    dimensions) needs each generation told before the next is sampled: an overlap the user set
    (`explicit`) is refused (a UserError), the default one becomes 0. ahead = 0: es as it is."""
    if ahead and getattr(es, "mean_shift_samples", False):
        if explicit:
            raise UserError("strategy.overlap: this step-size adaptation (TPA, pycma's for these options) needs "
                            "each generation told before the next is sampled; set strategy.overlap: 0")
        return es, 0
    if ahead and es.sp.lam_mirr and not keep_mirrors:
        import cma

        es = cma.CMAEvolutionStrategy(x0, sigma0, {**opts, "CMA_mirrors": 0})
    return es, ahead


def generational_state(es: bytes, generation: list, fitness: list, sent: int) -> dict:
    """A GenerationPipeline state (ahead 0) from a generational loop's: pickled es, the generation being
    evaluated, its values so far and how many were sent (what checkpoints held before `overlap`)."""
    countiter = int(pickle.loads(es).countiter)
    gens = [{"index": countiter, "xs": generation, "f": fitness, "sent": sent}] if generation else []
    return {"es": es, "ahead": 0, "sampled": countiter + len(gens), "gens": gens}


@dataclass
class Generation:
    """One pycma generation: its number (in the order sampled), the solutions as pycma
    returned them (told back as they are: pycma finds their genotypes by value), their minimised
    values (None until told) and how many are sent."""

    index: int
    xs: list[np.ndarray]
    f: list[float | None] = field(default_factory=list)
    sent: int = 0

    def __post_init__(self):
        if not self.f:
            self.f = [None] * len(self.xs)


class GenerationPipeline:
    """Overlapping pycma generations: up to `ahead` + 1 generations sampled and untold at once, each told
    to pycma as soon as it is complete (see the module docstring for the effect on the search). After
    each tell, the candidates of outstanding generations not sent yet are drawn again from the updated
    distribution, so each candidate comes from the newest distribution there is when it is sent.

    ask(n) -> [(generation number, index in it, x)], from one generation (fewer, or none when every
    allowed generation is sent); tell(generation, i, value) with pycma's minimised value. `ahead = 0`
    makes the same calls to pycma, in the same order, as a generational loop (es.ask() after each
    es.tell()). state_dict()/load_state_dict() round-trip it with es (pickled). Used by CMAES; usable
    by any strategy that drives a CMAEvolutionStrategy (e.g. Evo-Merging's stage 2).
    """

    def __init__(self, es, ahead: int):
        self.es = es
        self.ahead = ahead
        self.gens: list[Generation] = []  # sampled and not yet told, oldest first
        self.sampled = int(es.countiter)  # generations sampled so far (the next one's number)

    def ask(self, n: int) -> list[tuple[int, int, np.ndarray]]:
        g = next((g for g in self.gens if g.sent < len(g.xs)), None)
        if g is None:
            if len(self.gens) > self.ahead:
                return []
            g = Generation(self.sampled, self._sample())
            self.gens.append(g)
            self.sampled += 1
        k = min(n, len(g.xs) - g.sent)
        out = [(g.index, i, g.xs[i]) for i in range(g.sent, g.sent + k)]
        g.sent += k
        return out

    def tell(self, index: int, i: int, value: float) -> bool:
        """Record one value of generation `index`; when that completes the generation, tell pycma it
        (one iteration). Returns whether it did."""
        g = next(g for g in self.gens if g.index == index)
        g.f[i] = value
        if any(v is None for v in g.f):
            return False
        self.gens.remove(g)
        if self.es._flgtelldone:
            # told twice without an ask between (this generation was sampled before the last tell):
            # pycma guards against telling one iteration twice; this is the next one
            self.es._flgtelldone = False
        if self.es.pop_injection_directions or self.es.pop_injection_solutions:
            # selective mirrors (CMA_mirrors) the last tell prepared, that no full ask has taken since:
            # pycma refuses to prepare new ones over them, so they are dropped (never with ahead = 0)
            self.es.pop_injection_directions, self.es.pop_injection_solutions = [], []
        self.es.tell(g.xs, g.f)
        for h in self.gens:  # what is not sent yet is drawn again, from the distribution just updated
            k = len(h.xs) - h.sent
            if k:
                h.xs[h.sent:] = self._sample(k)
        return True

    def _sample(self, k: int | None = None) -> list[np.ndarray]:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return [np.asarray(x, np.float64) for x in self.es.ask(k)]

    @property
    def outstanding(self) -> int:
        return len(self.gens)

    def state_dict(self) -> dict:
        return {"es": pickle.dumps(self.es), "ahead": self.ahead, "sampled": self.sampled,
                "gens": [{"index": g.index, "xs": [x.copy() for x in g.xs], "f": list(g.f), "sent": g.sent}
                         for g in self.gens]}

    def load_state_dict(self, state: dict) -> None:
        self.es = pickle.loads(state["es"])
        self.ahead = state["ahead"]  # the run's own (a resume with other engine settings continues it exactly)
        self.sampled = state["sampled"]
        self.gens = [Generation(g["index"], [np.array(x) for x in g["xs"]], list(g["f"]), g["sent"])
                     for g in state["gens"]]


class CMAES(Strategy):
    generational = True
    races = True  # each generation is a cohort; pycma's update ranks its mu best

    def ranks_used(self) -> int | None:
        """pycma's mu: the parents its update ranks (racing finishes a candidate while it may be among them)."""
        return int(self.es.sp.weights.mu)

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
            es = cma.CMAEvolutionStrategy(x0, cfg.sigma0, opts)
        except ValueError as e:
            raise UserError(f"strategy.options: pycma refused the options: {e}") from None
        self.popsize = es.popsize
        ahead = cfg.overlap if cfg.overlap is not None else default_overlap(run.parallelism, self.popsize)
        es, ahead = fit_for_overlap(es, x0, cfg.sigma0, opts, ahead, keep_mirrors="CMA_mirrors" in cfg.options,
                                    explicit=cfg.overlap is not None)
        self.pipeline = GenerationPipeline(es, ahead)

    @property
    def es(self):
        return self.pipeline.es

    def ask(self, n: int) -> list[Candidate]:
        return [Candidate(x=x.astype(np.float32), step=g, tag=(g, i), cohort=g, cohort_size=self.popsize)
                for g, i, x in self.pipeline.ask(n)]

    def tell(self, results: Sequence[Result]) -> None:
        for r in results:
            tag = r.candidate.tag  # (generation, index); a bare index: asked before overlap existed (resumed)
            g, i = tag if isinstance(tag, tuple) else (self.pipeline.gens[0].index, tag)
            # pycma minimises; a failed candidate gets the engine's penalty, or the worst value
            self.pipeline.tell(g, i, -r.fitness if np.isfinite(r.fitness) else float("inf"))

    @property
    def done(self) -> bool:
        return self.cfg.respect_stop and bool(self.es.stop())

    def state_dict(self) -> dict:
        return self.pipeline.state_dict()

    def load_state_dict(self, state: dict) -> None:
        if "gens" not in state:  # a checkpoint from before `overlap`: that run resumes generational, as it began
            state = generational_state(state["es"], state["generation"], state["fitness"], state["sent"])
        self.pipeline.load_state_dict(state)

    def summary(self) -> dict:
        return {"generations": int(self.es.countiter), "sigma": float(self.es.sigma), "popsize": self.popsize,
                "overlap": self.pipeline.ahead}

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
