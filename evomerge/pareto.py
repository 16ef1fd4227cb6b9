"""Multi-objective results: the non-dominated evaluations over a fitness's objectives (per-task
metrics, higher is better), kept incrementally during a run, and selection by preference weights."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from .errors import UserError
from .rundir import iter_evals


def dominates(a: tuple, b: tuple) -> bool:
    return all(x >= y for x, y in zip(a, b)) and any(x > y for x, y in zip(a, b))


class ParetoFront:
    """Evaluations no other evaluation beats on every objective; a tie on all keeps the first."""

    def __init__(self, objectives: list[str]):
        self.objectives = list(objectives)
        self.members: list[dict] = []  # {"eval_id", "fitness", "objectives": {name: value}}

    def add(self, eval_id: int, fitness: float, metrics: dict) -> bool:
        if any(k not in metrics for k in self.objectives):
            return False
        point = tuple(float(metrics[k]) for k in self.objectives)
        if not all(map(math.isfinite, point)):
            return False  # not comparable (e.g. a task's metric is NaN): never on the front
        for m in self.members:
            q = tuple(m["objectives"][k] for k in self.objectives)
            if dominates(q, point) or q == point:
                return False
        self.members = [m for m in self.members
                        if not dominates(point, tuple(m["objectives"][k] for k in self.objectives))]
        self.members.append({"eval_id": eval_id, "fitness": fitness,
                             "objectives": dict(zip(self.objectives, point))})
        return True

    def sorted(self) -> list[dict]:
        return sorted(self.members, key=lambda m: (-m["fitness"], m["eval_id"]))


def parse_preference(text: str, objectives: list[str]) -> dict[str, float]:
    """'task_a=0.7,task_b=0.3' -> {objective: weight}; a task name stands for '<task>_accuracy'."""
    weights: dict[str, float] = {}
    for item in text.split(","):
        name, sep, value = item.strip().partition("=")
        if not sep:
            raise UserError(f"--prefer {text}: expected NAME=WEIGHT pairs separated by commas")
        key = name if name in objectives else f"{name}_accuracy"
        if key not in objectives:
            raise UserError(f"--prefer {text}: {name!r} is not an objective of this run; "
                            f"choose from {', '.join(objectives)}")
        try:
            weights[key] = float(value)
        except ValueError:
            raise UserError(f"--prefer {text}: weight of {name} is not a number") from None
    return weights


def pareto_mask(points: np.ndarray) -> np.ndarray:
    """Rows of `points` (higher is better) no other row beats on every column; of equal rows, the first
    (the members ParetoFront keeps, added in row order)."""
    n = len(points)
    keep = np.zeros(n, bool)
    if n == 0:
        return keep
    uniq, first = np.unique(points, axis=0, return_index=True)
    order = np.lexsort(uniq.T[::-1])[::-1]  # lexicographically descending: no later row dominates an earlier one
    front: list[np.ndarray] = []
    for j in order:
        p = uniq[j]
        if front:
            f = np.asarray(front)
            if np.any(np.all(f >= p, axis=1)):  # unique rows: >= everywhere means dominates
                continue
        front.append(p)
        keep[first[j]] = True
    return keep


def front_of_run(run: Path, objectives: list[str]) -> ParetoFront:
    """The front of run directory `run`'s evaluations (not failed, not cached), from evals.jsonl."""
    front = ParetoFront(objectives)
    for rec in iter_evals(run):
        if not rec.get("failed") and rec.get("cached_from") is None:
            metrics = {k: math.nan if v is None else v for k, v in (rec.get("metrics") or {}).items()}
            front.add(rec["id"], rec["fitness"], metrics)  # null: a non-finite number (rundir.dumps)
    return front


def preferred(front: ParetoFront, weights: dict[str, float]) -> dict:
    """The front member with the largest weighted sum (ties: higher fitness, then earlier)."""
    if not front.members:
        raise UserError("--prefer: the run has no successful evaluation")
    return max(front.members, key=lambda m: (sum(w * m["objectives"][k] for k, w in weights.items()),
                                             m["fitness"], -m["eval_id"]))
