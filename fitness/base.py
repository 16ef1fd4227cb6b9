"""The interface of evaluators: one base class, whose `input` says what it scores.

* "vector": the point itself, a batch at a time (`evaluate` / `holdout`), e.g. the digits MLP's weights;
* "model": a materialized model, the worker's resident one into which each candidate is merged in
  place (`evaluate_model` / `holdout_model`, and `loss_model` when `differentiable`);
* "recipe": the decoded recipe, scored without materializing anything locally, e.g. through an API
  that merges server-side (`evaluate_recipe` / `holdout_recipe`).

Scores are per-example (what M2N2's competition and per-task reports use) plus named metrics;
`fitness` is the scalar the search maximises.

Example subsets: a fitness whose `example_counts` is not None scores any subset of its search split.
`examples` (every evaluate method takes it) is then a sorted 1-D int array of indices into the
concatenated search examples (tasks in config order, task t's examples at offsets
sum(counts[:t]) .. sum(counts[:t+1]) - 1), or None for all of them. The per-example scores returned
are those of `examples`, in that order; each per-task metric is over the task's selected examples
(omitted for a task with none selected), and the fitness is the weighted mean over the tasks that have
any. A subset's fitness is then the estimate of the full split's that the same formula gives.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Literal, Protocol

import numpy as np

InputKind = Literal["vector", "model", "recipe"]
INPUT_KINDS: tuple[str, ...] = ("vector", "model", "recipe")


@dataclass
class BatchEvaluation:
    """Scores of a batch of B candidates.

    fitness: (B,) the scalar the search maximises; scores: (B, n_examples) per-example
    scores (what M2N2's competition and per-task reports use); metrics: name -> (B,) values.
    """

    fitness: np.ndarray
    scores: np.ndarray | None
    metrics: dict[str, np.ndarray] = field(default_factory=dict)


class SharedResource(Protocol):
    """What a fitness shares between all workers of a run (opened by `Fitness.open_shared`)."""

    def state(self) -> dict:
        """What the run's checkpoint keeps of it (e.g. the API requests and tokens spent)."""


class Fitness:
    """An evaluator, built once inside each worker (it holds the data and, for a model fitness, the
    worker holds the resident model).

    `input` is what it scores (see the module's docstring: only that kind's methods are called);
    `spaces` names the search spaces whose points it knows how to score; `differentiable`: it has
    a `loss_model` that gradient-based oracles (Frank-Wolfe's `oracle: gradient`) differentiate.
    `shared` is what `open_shared` opened for the run, handed to every worker (None: nothing).
    """

    input: ClassVar[InputKind]
    spaces: ClassVar[tuple[str, ...]] = ()
    differentiable: ClassVar[bool] = False

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        declared = next((vars(k)["input"] for k in cls.__mro__ if "input" in vars(k)), None)
        if declared not in INPUT_KINDS:
            raise TypeError(f"{cls.__name__}.input must be one of {INPUT_KINDS}, not {declared!r}")

    def __init__(self, cfg, shared: SharedResource | None = None):
        self.cfg = cfg
        self.shared = shared

    @classmethod
    def objectives(cls, cfg) -> list[str]:
        """Metric names that are separate objectives (per task, higher is better); two or more make
        the run report a Pareto front. Default: none beyond the fitness."""
        return []

    @classmethod
    def example_counts(cls, cfg) -> list[int] | None:
        """Search examples per task, in the order the per-example scores are concatenated, when the
        fitness can score a subset of them (see the module's docstring); None (the default): it cannot.
        Called in the driver (it may read the task files)."""
        return None

    @classmethod
    def from_scores(cls, cfg, counts: list[int], examples: np.ndarray | None, scores: np.ndarray
                    ) -> tuple[float, dict[str, float]] | None:
        """(fitness, the metrics that derive from the per-example scores) of `scores` on `examples` (None:
        all; counts: example_counts), as the evaluate methods compute them: how racing joins a candidate's
        two slices without scoring the first again (its other metrics, e.g. requests, are summed). None
        (the default): not derivable, so a raced candidate that goes on is scored on all its examples."""
        return None

    @classmethod
    def check(cls, cfg) -> None:
        """Refuse, in the driver before anything starts, what cannot work (e.g. a missing API key or
        a defective task file). Default: nothing to check."""

    @classmethod
    def open_shared(cls, cfg, state: dict | None) -> SharedResource | None:
        """The run-level resource the workers share (e.g. the API budget), opened by the engine in the
        driver before the workers start, from `state` (what its `state()` was at the last checkpoint
        of a resumed run, else None). Default: none."""
        return None

    def _missing(self, method: str) -> NotImplementedError:
        return NotImplementedError(f"{type(self).__name__} (input {self.input!r}) has no {method}")

    # input "vector" --------------------------------------------------------------------------------
    def evaluate(self, batch: np.ndarray, examples: np.ndarray | None = None) -> BatchEvaluation:
        """Score a batch of points (B, dim) on the search split (`examples`: the same subset for all)."""
        raise self._missing("evaluate")

    def holdout(self, x: np.ndarray) -> dict[str, float]:
        """Metrics of one point on held-out data (reported for the best, never searched on)."""
        raise self._missing("holdout")

    # input "model" ---------------------------------------------------------------------------------
    def evaluate_model(self, model, tokenizer, examples: np.ndarray | None = None
                       ) -> tuple[float, np.ndarray, dict[str, float]]:
        """(fitness, per-example scores (1-D, concatenated over tasks), metrics) on the search split."""
        raise self._missing("evaluate_model")

    def holdout_model(self, model, tokenizer) -> dict[str, float]:
        """Metrics on the held-out split (reported for the best, never searched on)."""
        raise self._missing("holdout_model")

    def loss_model(self, model, tokenizer):
        """A differentiable fitness's scalar loss (a torch tensor with its autograd graph, lower is
        better) on the search split, which gradient oracles differentiate through the resident model."""
        raise self._missing("loss_model")

    # input "recipe" --------------------------------------------------------------------------------
    def evaluate_recipe(self, recipe: dict, examples: np.ndarray | None = None
                        ) -> tuple[float, np.ndarray, dict[str, float]]:
        """(fitness, per-example scores, metrics) on the search split."""
        raise self._missing("evaluate_recipe")

    def holdout_recipe(self, recipe: dict) -> dict[str, float]:
        """Metrics on the held-out split."""
        raise self._missing("holdout_recipe")


class StopRun(Exception):
    """Raised by a fitness when the run must stop cleanly (e.g. its API budget is spent): the candidate
    is neither failed nor logged, the engine checkpoints and stops; a resumed run evaluates it."""


def split_examples(examples: np.ndarray | None, counts: list[int]) -> list[np.ndarray | None]:
    """Per task, the local indices of `examples` (indices into the concatenated search split of tasks
    with `counts` examples; see the module's docstring) that fall in it; all None when examples is None.
    A ValueError for indices that are not sorted, unique and in range."""
    if examples is None:
        return [None] * len(counts)
    ex = np.asarray(examples, dtype=np.int64).reshape(-1)
    total = int(sum(counts))
    if ex.size and (ex[0] < 0 or ex[-1] >= total or np.any(np.diff(ex) <= 0)):
        raise ValueError(f"examples must be sorted unique indices in 0..{total - 1}")
    edges = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    return [ex[(ex >= lo) & (ex < hi)] - lo for lo, hi in zip(edges[:-1], edges[1:])]


def task_summary(names: list[str], weights: list[float], counts: list[int], examples: np.ndarray | None,
                 scores: np.ndarray) -> tuple[float, dict[str, float]]:
    """Per task `<name>_accuracy` (the mean score of its selected examples; omitted for a task with none) and
    the fitness, their weighted mean: the formula of the tasks fitnesses (lm_tasks, api), for from_scores."""
    s = np.asarray(scores, np.float64).reshape(-1)
    metrics, num, den, at = {}, 0.0, 0.0, 0
    for name, w, count, sel in zip(names, weights, counts, split_examples(examples, counts)):
        n = count if sel is None else sel.size
        part = s[at:at + n]
        at += n
        if n:
            metrics[f"{name}_accuracy"] = float(part.mean())
            num, den = num + w * metrics[f"{name}_accuracy"], den + w
    return (num / den if den else float("nan")), metrics
