"""The ask/tell interface every search strategy implements."""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, ClassVar, Sequence

import numpy as np


@dataclass
class Candidate:
    """One point to evaluate. `step` is the strategy's own counter (child number, generation)."""

    x: np.ndarray
    step: int
    tag: Any = None  # strategy-private bookkeeping, returned untouched in the Result
    # the search examples to score it on: sorted indices into the fitness's concatenated search split
    # (tasks in config order; RunContext.example_counts gives each task's count). None: the engine decides
    # (all of them, or the cohort's subset under `scoring`). A strategy that sets it combines the scores.
    examples: np.ndarray | None = None
    # candidates the strategy ranks against each other share a cohort (e.g. a CMA-ES generation): under
    # `scoring` the engine scores a cohort on one example subset, and races it. cohort_size: how many
    # candidates the cohort will have (racing decides once all have their first slice). None: no cohort.
    cohort: int | None = None
    cohort_size: int | None = None


@dataclass
class Result:
    """What the engine tells a strategy about one evaluated candidate (fitness: higher is better)."""

    candidate: Candidate
    fitness: float
    scores: np.ndarray | None = None  # per-example scores, e.g. 1/0 correctness per training example
    metrics: dict[str, float] = field(default_factory=dict)
    failed: bool = False
    # the examples `scores` and `fitness` come from (indices, as Candidate.examples); None: all of them
    examples: np.ndarray | None = None
    # fitness is an estimate from part of the examples the engine meant to use: racing stopped the
    # candidate after its first slice (scores cover `examples`, that slice)
    raced: bool = False


@dataclass(frozen=True)
class SpaceInfo:
    """All a strategy knows of the search space."""

    dim: int
    seeds: tuple[np.ndarray, ...]
    lower: np.ndarray | None = None
    upper: np.ndarray | None = None
    random_seeds: bool = False  # seeds are random initialisations, not trained models
    # what each coordinate is, in merge spaces: (group, parameter, expert) per coordinate
    layout: tuple[tuple[str, str, str], ...] | None = None
    # mixture spaces (hf_mixture): the point is (cells, S) coefficients over the S seed models, and
    # gram[c] their inner products <seed_i, seed_j> restricted to cell c
    gram: np.ndarray | None = None


@dataclass(frozen=True)
class RunContext:
    """What a strategy knows of the run it serves (some plan with it, e.g. nevergrad)."""

    parallelism: int = 1  # candidates the engine keeps outstanding at once
    max_evals: int | None = None  # the run's budget.max_evals
    # search examples per task of the fitness (Fitness.example_counts), in the order the per-example
    # scores are concatenated; None: the fitness cannot score a subset (Candidate.examples unusable)
    example_counts: tuple[int, ...] | None = None
    # the fitness's objectives (Fitness.objectives: metric names in Result.metrics, higher is better) when it
    # has two or more, else () (one objective: the fitness)
    objectives: tuple[str, ...] = ()


class Strategy(ABC):
    """ask(n) -> candidates, tell(results), state_dict()/load_state_dict(), done.

    `ask` may return fewer than n candidates, or none, when it needs results first
    (a generational strategy between generations, or seeds not yet scored).
    A steady-state strategy accepts each result as soon as it arrives; a generational
    one (`generational = True`) needs a whole generation before it can ask again.
    Built by `build` (the registry's way), from the config, what it knows of the space, the seed
    of its random draws and the run's context.
    """

    generational: ClassVar[bool] = False

    def __init__(self, cfg, space: SpaceInfo, seed: int, run: RunContext):
        self.cfg = cfg
        self.run = run

    @classmethod
    def build(cls, cfg, space: SpaceInfo, seed: int, run: RunContext) -> Strategy:
        """The strategy for this config (a registered class may pick one of several forms)."""
        return cls(cfg, space, seed, run)

    @classmethod
    def preflight(cls, cfg, dim: int) -> None:
        """Refuse a config that cannot work in `dim` dimensions, before anything heavy starts."""

    @classmethod
    def check_objectives(cls, cfg, objectives: Sequence[str]) -> None:
        """Refuse a config that cannot work with the fitness's objectives (RunContext.objectives: two or
        more, else none), before anything heavy starts (e.g. a multi-objective algorithm on one objective)."""

    @classmethod
    def extra_metrics(cls, cfg) -> tuple[str, ...]:
        """What the workers must compute for every candidate beyond its fitness, returned as extra
        metrics. Known: "weight_gradient" (d loss / d merge weight per group and expert, metrics
        'dloss/<group>/<expert>', from the fitness's differentiable `loss_model`)."""
        return ()

    # M2N2 compares per-example score vectors across its whole archive: every candidate must be scored
    # on the same examples (under scoring.subsample: one subset for the run, scoring.resample false)
    same_examples: ClassVar[bool] = False

    races: ClassVar[bool] = False  # it has cohorts and ranks_used: scoring.race applies

    def ranks_used(self) -> int | None:
        """How many of a cohort's best the strategy's update ranks (racing finishes a candidate while it
        may be among them, e.g. CMA-ES's mu parents); None (the default): racing does not apply."""
        return None

    has_archive: ClassVar[bool] = False  # it keeps an archive a report shows (archive_view), e.g. M2N2

    @classmethod
    def archive_view(cls, state: dict) -> dict | None:
        """What a report may show of the archive in `state` (a `state_dict()`, the checkpoint's
        "strategy" entry): {"scores": (members, examples) per-example scores, "fitness": (members,)}
        of the archive's members, or None (no archive, or nothing in it)."""
        return None

    @abstractmethod
    def ask(self, n: int) -> list[Candidate]: ...

    @abstractmethod
    def tell(self, results: Sequence[Result]) -> None: ...

    @abstractmethod
    def state_dict(self) -> dict:
        """Everything a resumed run needs to continue the search exactly (pickled in the checkpoint)."""

    @abstractmethod
    def load_state_dict(self, state: dict) -> None: ...

    @property
    def done(self) -> bool:
        """The search has ended by itself (e.g. its iterations are done); the run stops."""
        return False

    def summary(self) -> dict:
        """Strategy-specific facts for summary.json."""
        return {}

    def stats(self) -> dict[str, float]:
        """Numbers describing the search's state now (e.g. CMA-ES's sigma, M2N2's archive diversity),
        logged over time to strategy.jsonl. Called every ~1/500 of the budget: keep it cheap,
        O(archive x dim) at most."""
        return {}


def rng_state(rng: np.random.Generator) -> dict:
    return rng.bit_generator.state


def set_rng_state(rng: np.random.Generator, state: dict) -> None:
    rng.bit_generator.state = state
