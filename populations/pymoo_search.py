"""pymoo's algorithms over the space: NSGA-II/III, MOEA/D, SPEA2, ... on the fitness's objectives, or GA,
DE, PSO, ES, ... on the scalar fitness, through pymoo's ask/tell interface.

The problem is the space's box (`Problem(n_var=dim, n_obj, xl, xu)`; an unbounded space: the seeds' hull
widened by `margin`). A multi-objective algorithm minimises the negatives of the fitness's objectives
(RunContext.objectives, e.g. the per-task accuracies of lm_tasks, read from each Result's metrics); on a
fitness with one objective it is refused before anything starts. A single-objective one minimises
-fitness. `algorithm.ask()` gives a population (a generation's offspring); its individuals are handed
out one by one, as the engine asks; once every one of them is told, the population goes back through
`algorithm.tell(infills=pop)` (F set by pymoo's Evaluator, as in its ask-and-tell docs) and the next is
asked. pymoo's algorithms cannot ask before they are told, so a generation waits for its slowest
candidate; `kwargs: {n_offsprings: k}` (GA-based algorithms: NSGA-II, NSGA-III, SPEA2, GA, ...) makes
generations of k offspring, steady-state NSGA-II at k ~ the engine's parallelism.

A failed candidate is told the engine's failure_penalty on every objective (its Result's fitness), or,
without a penalty, the worst value told so far on that objective, plus 1 (pymoo's survival ranks by
differences, which infinities would break); so is a missing or non-finite objective of a successful one.
The values of a generation are fixed when it completes, so the arrival order inside it does not matter.

State: the algorithm (a plain Python object: its population, random generator, operators) and the
population being handed out are pickled together; a pymoo function wrapped by its `default_random_state`
decorator (unpicklable by pickle: a local function) is pickled by its module and name. At construction
a copy of the algorithm runs two generations on random values and is pickled: an algorithm that cannot
be pickled mid-run (e.g. one that keeps a Python generator, like pymoo's sequential MOEA/D; `moead`
here is its batch form, ParallelMOEAD) is refused before the first evaluation.
"""
from __future__ import annotations

import copy
import difflib
import importlib
import inspect
import io
import math
import pickle
import sys
import types
import warnings
from typing import Any, Literal, Sequence

import numpy as np
from pydantic import Field, model_validator

from evomerge.errors import UserError
from evomerge.schema import Frozen

from .base import Candidate, Result, RunContext, SpaceInfo, Strategy

# name -> (module, class, multi-objective, takes reference directions)
ALGORITHMS: dict[str, tuple[str, str, bool, bool]] = {
    "nsga2": ("pymoo.algorithms.moo.nsga2", "NSGA2", True, False),
    "nsga3": ("pymoo.algorithms.moo.nsga3", "NSGA3", True, True),
    "unsga3": ("pymoo.algorithms.moo.unsga3", "UNSGA3", True, True),
    "moead": ("pymoo.algorithms.moo.moead", "ParallelMOEAD", True, True),
    "spea2": ("pymoo.algorithms.moo.spea2", "SPEA2", True, False),
    "smsemoa": ("pymoo.algorithms.moo.sms", "SMSEMOA", True, False),
    "gde3": ("pymoo.algorithms.moo.gde3", "GDE3", True, False),
    "nsde": ("pymoo.algorithms.moo.nsde", "NSDE", True, False),
    "ga": ("pymoo.algorithms.soo.nonconvex.ga", "GA", False, False),
    "de": ("pymoo.algorithms.soo.nonconvex.de", "DE", False, False),
    "pso": ("pymoo.algorithms.soo.nonconvex.pso", "PSO", False, False),
    "es": ("pymoo.algorithms.soo.nonconvex.es", "ES", False, False),
    "sres": ("pymoo.algorithms.soo.nonconvex.sres", "SRES", False, False),
}
MULTI_OBJECTIVE = tuple(n for n, a in ALGORITHMS.items() if a[2])
DEFAULT_POP = 100  # reference-direction algorithms without pop_size: at most this many directions


class PymooConfig(Frozen):
    name: Literal["pymoo"]
    algorithm: Literal[("auto", *ALGORITHMS)] = Field(  # type: ignore[valid-type]
        "auto", description="pymoo algorithm: multi-objective (" + ", ".join(MULTI_OBJECTIVE) + ") on the "
                            "fitness's objectives, or single-objective (" + ", ".join(
                                n for n in ALGORITHMS if n not in MULTI_OBJECTIVE) + ") on the fitness; "
                            "auto: nsga2 when the fitness has several objectives, else ga")
    pop_size: int | None = Field(None, ge=2, description="population size (default pymoo's: 100, PSO 25); "
                                                         "NSGA-III, UNSGA-III, MOEA/D: at most this many "
                                                         "Das-Dennis reference directions when kwargs has no "
                                                         "ref_dirs (MOEA/D's population is one per direction)")
    kwargs: dict[str, Any] = Field(default_factory=dict,
                                   description="further keyword arguments of the pymoo algorithm's class "
                                               "(numbers, strings, lists: e.g. n_offsprings, eliminate_duplicates, "
                                               "CR and F for DE, ref_dirs as a list of rows)")
    seeds: bool = Field(True, description="the space's seed points (clipped to the bounds) start the first "
                                          "population, the rest uniform in the bounds; false: pymoo's sampling")
    bounds: tuple[float, float] | None = Field(None, description="[low, high] for every coordinate; default the "
                                                                 "space's")
    margin: float = Field(1.0, gt=0, description="unbounded space without `bounds`: the box is the seeds' hull "
                                                 "widened by this on every side")

    @model_validator(mode="after")
    def _constructs(self):
        if self.bounds is not None and not self.bounds[0] < self.bounds[1]:
            raise ValueError("bounds: low must be below high")
        for key in ("seed", "termination", "sampling" if self.seeds else None):
            if key in self.kwargs:
                raise ValueError(f"kwargs.{key}: set by the run (seed: the run's seed; termination: the budget; "
                                 "sampling: strategy.seeds)")
        try:
            for name in (("nsga2", "ga") if self.algorithm == "auto" else (self.algorithm,)):
                n_obj = 3 if ALGORITHMS[name][2] else 1  # the fitness's count is checked when the run starts
                if ALGORITHMS[name][3] and "ref_dirs" in self.kwargs:
                    n_obj = ref_dirs(self.kwargs["ref_dirs"]).shape[1]
                make_algorithm(self, n_obj=n_obj, seed=0, name=name)
        except UserError as e:
            raise ValueError(str(e).removeprefix("strategy.")) from None
        return self


def _algorithm_class(name: str):
    module, cls, _, _ = ALGORITHMS[name]
    try:
        import pymoo  # noqa: F401
    except ImportError:
        raise UserError("strategy.name: pymoo needs the pymoo package: pip install -e '.[pymoo]'") from None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from pymoo.config import Config

        Config.warnings["not_compiled"] = False  # pymoo's pure-Python fallbacks are fine here
        return getattr(importlib.import_module(module), cls)


def ref_dirs(value) -> np.ndarray:
    """kwargs.ref_dirs as an array of rows (a UserError naming the field otherwise)."""
    try:
        out = np.asarray(value, np.float64)
    except (TypeError, ValueError):
        out = None
    if out is None or out.ndim != 2 or out.shape[1] < 2 or len(out) < 1:
        raise UserError("strategy.kwargs.ref_dirs: a list of rows (reference directions), each with one number "
                        "per objective (two or more)")
    return out


def das_dennis(n_obj: int, most: int) -> np.ndarray:
    """Das-Dennis reference directions: the most partitions with at most `most` directions (at least 1)."""
    from pymoo.util.ref_dirs import get_reference_directions

    p = 1
    while math.comb(p + 1 + n_obj - 1, n_obj - 1) <= most:
        p += 1
    return get_reference_directions("das-dennis", n_obj, n_partitions=p)


def resolve(algorithm: str, objectives: Sequence[str]) -> str:
    """The algorithm `strategy.algorithm` names (auto: nsga2 on two or more objectives, else ga)."""
    if algorithm == "auto":
        return "nsga2" if len(objectives) >= 2 else "ga"
    return algorithm


def make_algorithm(cfg: PymooConfig, n_obj: int, seed: int, sampling: np.ndarray | None = None,
                   name: str | None = None):
    """The pymoo algorithm `name` (default cfg.algorithm) of `cfg`, not set up; a UserError naming the field
    when pymoo refuses."""
    name = name or cfg.algorithm
    cls = _algorithm_class(name)
    kw = dict(cfg.kwargs)
    if ALGORITHMS[name][3]:
        if "ref_dirs" in kw:
            kw["ref_dirs"] = ref_dirs(kw["ref_dirs"])
            if kw["ref_dirs"].shape[1] != n_obj:
                raise UserError(f"strategy.kwargs.ref_dirs: rows of {n_obj} numbers (one per objective) expected, "
                                f"got shape {kw['ref_dirs'].shape}")
        else:
            kw["ref_dirs"] = das_dennis(n_obj, cfg.pop_size or DEFAULT_POP)
    if cfg.pop_size is not None and name != "moead":
        kw["pop_size"] = cfg.pop_size
    if sampling is not None:
        kw["sampling"] = sampling
    known = {name for c in cls.__mro__ if "__init__" in vars(c)
             for name, p in inspect.signature(c.__init__).parameters.items()
             if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL) and name != "self"}
    for key in cfg.kwargs:
        if key not in known:  # pymoo's Algorithm swallows unknown keywords silently
            close = difflib.get_close_matches(key, sorted(known), n=3)
            hint = f"; did you mean {', '.join(close)}?" if close else f"; it takes {', '.join(sorted(known))}"
            raise UserError(f"strategy.kwargs.{key}: not a parameter of pymoo's {cls.__name__}{hint}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return cls(seed=seed, **kw)
    except (TypeError, ValueError, AssertionError, KeyError) as e:
        raise UserError(f"strategy.kwargs: pymoo's {cls.__name__} refused {kw_text(cfg.kwargs)} "
                        f"({type(e).__name__}: {e})") from None


def kw_text(kw: dict) -> str:
    return "{" + ", ".join(f"{k}: {v!r}" for k, v in kw.items()) + "}" if kw else "no kwargs"


# pickling ---------------------------------------------------------------------------------------

def _module_attr(module: str, qualname: str):
    obj = importlib.import_module(module)
    for part in qualname.split("."):
        obj = getattr(obj, part)
    return obj


class _Pickler(pickle.Pickler):
    """pickle.Pickler, with the functions pymoo wraps in `default_random_state` (a local `wrapper`, without
    functools.wraps, under the original function's module-level name) pickled by that name."""

    def reducer_override(self, obj):
        if isinstance(obj, types.FunctionType) and "<locals>" in obj.__qualname__ and obj.__closure__:
            for cell in obj.__closure__:
                inner = cell.cell_contents
                if isinstance(inner, types.FunctionType) and inner.__module__ in sys.modules:
                    try:
                        if _module_attr(inner.__module__, inner.__qualname__) is obj:
                            return _module_attr, (inner.__module__, inner.__qualname__)
                    except AttributeError:
                        continue
        return NotImplemented


def dumps(obj) -> bytes:
    buf = io.BytesIO()
    _Pickler(buf, protocol=pickle.HIGHEST_PROTOCOL).dump(obj)
    return buf.getvalue()


# the strategy -----------------------------------------------------------------------------------

def _problem_class():
    from pymoo.core.problem import Problem

    return Problem


class Pymoo(Strategy):
    generational = True  # pymoo asks a generation after the previous one is told

    @classmethod
    def check_objectives(cls, cfg: PymooConfig, objectives: Sequence[str]) -> None:
        if cfg.algorithm != "auto" and ALGORITHMS[cfg.algorithm][2] and len(objectives) < 2:
            single = ", ".join(n for n in ALGORITHMS if n not in MULTI_OBJECTIVE)
            raise UserError(f"strategy.algorithm: {cfg.algorithm} is multi-objective, and this fitness has one "
                            f"objective (one task); choose a single-objective algorithm ({single}) or a fitness "
                            "with several tasks")

    def __init__(self, cfg: PymooConfig, space: SpaceInfo, seed: int, run: RunContext):
        super().__init__(cfg, space, seed, run)
        objectives = tuple(getattr(run, "objectives", ()) or ())
        self.check_objectives(cfg, objectives)
        self.name = name = resolve(cfg.algorithm, objectives)
        self.objectives = objectives if ALGORITHMS[name][2] else ()
        self.n_obj = max(1, len(self.objectives))
        lower, upper = self._box(cfg, space)
        seeds_x = None
        if cfg.seeds:
            probe = make_algorithm(cfg, self.n_obj, seed, name=name)
            n = int(getattr(probe, "pop_size", None) or DEFAULT_POP)
            rng = np.random.default_rng(seed)
            given = np.clip(np.asarray(space.seeds, np.float64).reshape(-1, space.dim), lower, upper)[:n]
            seeds_x = np.vstack([given, rng.uniform(lower, upper, (n - len(given), space.dim))])
        self.algorithm = make_algorithm(cfg, self.n_obj, seed, sampling=seeds_x, name=name)
        from pymoo.core.termination import NoTermination

        problem = _problem_class()(n_var=space.dim, n_obj=self.n_obj, xl=lower, xu=upper)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            self.algorithm.setup(problem, termination=NoTermination())
        self.pop = None  # the population being handed out and told
        self.single = False  # the algorithm asked one Individual (told back as one)
        self.f: list[np.ndarray | None] = []  # its minimised objective values, None until told
        self.sent = 0
        self.generation = 0  # populations asked so far
        self.steps = 0
        self.worst = np.full(self.n_obj, -np.inf)  # the largest finite minimised value told, per objective
        self.ended = False
        self._check_pickles()

    @staticmethod
    def _box(cfg: PymooConfig, space: SpaceInfo) -> tuple[np.ndarray, np.ndarray]:
        if cfg.bounds is not None:
            return np.full(space.dim, cfg.bounds[0], np.float64), np.full(space.dim, cfg.bounds[1], np.float64)
        if space.lower is not None:
            return np.asarray(space.lower, np.float64), np.asarray(space.upper, np.float64)
        seeds = np.asarray(space.seeds, np.float64).reshape(-1, space.dim)
        return seeds.min(axis=0) - cfg.margin, seeds.max(axis=0) + cfg.margin

    def _check_pickles(self) -> None:
        """Two generations of a copy on random values, then pickled: refused now, not at the first checkpoint."""
        alg = copy.deepcopy(self.algorithm)
        rng = np.random.default_rng(0)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                for _ in range(2):
                    pop, single = _ask(alg)
                    if pop is None:
                        break
                    _evaluate(alg, pop, rng.random((len(pop), self.n_obj)))
                    alg.tell(infills=pop[0] if single else pop)
            pickle.loads(dumps(alg))
        except Exception as e:  # noqa: BLE001 - whatever stops pickling stops checkpoints
            raise UserError(f"strategy.algorithm: pymoo's {type(self.algorithm).__name__} cannot be pickled "
                            f"mid-run ({type(e).__name__}: {e}), so the run could not be checkpointed or resumed; "
                            "choose another algorithm") from None

    def ask(self, n: int) -> list[Candidate]:
        if self.pop is None:
            if self.ended:
                return []
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                pop, self.single = _ask(self.algorithm)
            if pop is None:  # e.g. mating found no new offspring: pymoo has terminated
                self.ended = True
                return []
            self.pop, self.f, self.sent = pop, [None] * len(pop), 0
            self.generation += 1
        X = self.pop.get("X")
        k = min(n, len(X) - self.sent)
        out = [Candidate(x=np.asarray(X[i], np.float32), step=self.steps + j, tag=(self.generation, i),
                         cohort=self.generation, cohort_size=len(X))
               for j, i in enumerate(range(self.sent, self.sent + k))]
        self.sent += k
        self.steps += k
        return out

    def tell(self, results: Sequence[Result]) -> None:
        for r in results:
            g, i = r.candidate.tag
            assert self.pop is not None and g == self.generation, "told a candidate of another generation"
            self.f[i] = self._values(r)
        if self.pop is not None and all(v is not None for v in self.f):
            self._tell_generation()

    def _values(self, r: Result) -> np.ndarray:
        """The minimised objective values of one result; NaN where the failure rule decides (at completion)."""
        if r.failed:
            return np.full(self.n_obj, -r.fitness if np.isfinite(r.fitness) else np.nan)
        if self.objectives:
            vals = [r.metrics.get(k, math.nan) for k in self.objectives]
            return np.array([-float(v) if v is not None and np.isfinite(v) else np.nan for v in vals])
        return np.array([-r.fitness if np.isfinite(r.fitness) else np.nan])

    def _tell_generation(self) -> None:
        F = np.stack(self.f).astype(np.float64)
        finite = np.where(np.isfinite(F), F, -np.inf)
        self.worst = np.maximum(self.worst, finite.max(axis=0))
        fill = np.where(np.isfinite(self.worst), self.worst + 1.0, 1.0)
        F = np.where(np.isfinite(F), F, fill)
        pop, self.pop, self.f, self.sent = self.pop, None, [], 0
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            _evaluate(self.algorithm, pop, F)
            self.algorithm.tell(infills=pop[0] if self.single else pop)

    @property
    def done(self) -> bool:
        return self.ended

    def state_dict(self) -> dict:
        # one pickle: the population handed out stays the very object the algorithm made
        return {"blob": dumps((self.algorithm, self.pop, self.single, self.f, self.sent, self.generation,
                               self.steps, self.worst, self.ended))}

    def load_state_dict(self, state: dict) -> None:
        (self.algorithm, self.pop, self.single, self.f, self.sent, self.generation, self.steps, self.worst,
         self.ended) = pickle.loads(state["blob"])

    def _optimum(self) -> np.ndarray | None:
        opt = self.algorithm.opt
        return None if opt is None or len(opt) == 0 else np.asarray(opt.get("F"), np.float64)

    def summary(self) -> dict:
        out = {"algorithm": self.name, "pymoo_class": type(self.algorithm).__name__,
               "generations": self.generation, "pop_size": int(getattr(self.algorithm, "pop_size", 0) or 0),
               "told": int(self.algorithm.evaluator.n_eval), "objectives": list(self.objectives) or ["fitness"]}
        F = self._optimum()
        if F is not None:
            out["optimum_size"] = len(F)  # pymoo's non-dominated set of its population (its best, one objective)
        if ALGORITHMS[self.name][3]:
            out["ref_dirs"] = len(self.algorithm.ref_dirs)
        return out

    def stats(self) -> dict[str, float]:
        out = {"generation": float(self.generation)}
        F = self._optimum()
        if F is not None:
            if self.objectives:
                out["optimum_size"] = float(len(F))
                for k, col in zip(self.objectives, (-F).max(axis=0)):
                    out[f"best_{k}"] = float(col)
            else:
                out["best"] = float(-F.min())
        return out


def _ask(algorithm):
    """(population, single) of algorithm.ask(): single when it asked one Individual (sequential algorithms,
    told back the Individual); (None, False) when it has nothing more to ask (pymoo terminated)."""
    from pymoo.core.population import Population

    asked = algorithm.ask()
    if asked is None:
        return None, False
    if not isinstance(asked, Population):
        return Population.create(asked), True
    return (asked, False) if len(asked) else (None, False)


def _evaluate(algorithm, pop, F: np.ndarray) -> None:
    """F on `pop` as pymoo's own evaluation sets it (with CV and feasibility), counted by the algorithm."""
    from pymoo.problems.static import StaticProblem

    algorithm.evaluator.eval(StaticProblem(algorithm.problem, F=F), pop)
