"""The merge methods: one table, one entry per method, read by every part that knows about methods.

The `hf_merge` space takes its method names, allowed parameters and ranges from it; `merge.py` and
`kernels.py` dispatch on its fields (what the merge reads, which mask selects task-vector entries, sign
election, the default of `normalize`); the memory plan counts each method's inputs; the mergekit export
writes its mergekit name; the README's method catalog (`reference.py`) prints its parameters and doc.
No torch here: the table is read by configs and plans that load no weights.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Param:
    """A searched per-expert parameter (mergekit's name): its default search range, the values it may take
    (None: any) and the value a merge uses where a recipe's group does not give it."""

    name: str
    search: tuple[float, float]
    valid: tuple[float, float] | None
    unset: float


PARAMS = {p.name: p for p in (
    Param("weight", (0.0, 1.0), None, 1.0),
    Param("density", (0.1, 1.0), (1e-6, 1.0), 1.0),
    Param("gamma", (0.0, 0.05), (0.0, 1.0), 0.01),
    Param("t", (0.0, 1.0), (0.0, 1.0), 0.5),
)}


@dataclass(frozen=True)
class Method:
    """One merge method with mergekit's semantics.

    inputs: what a tensor's merge reads: "experts" (the experts themselves, no base), "slerp" (the base
    and its one expert) or "task_vectors" (the base and one task vector, expert - base, per expert).
    mask: how task-vector entries are selected: None (all), "magnitude" (the top `density` share by
    magnitude: TIES), "outlier" (without the largest `gamma` share, keeping `density`: breadcrumbs) or
    "dare" (kept at random with probability `density`, rescaled).
    consensus: TIES sign election. normalize: the default of `normalize` (divide by the sum of weights).
    linear_in_weights: the merged tensor is linear in the weights (gradient oracles can differentiate it).
    mergekit: mergekit's `merge_method` (None: no mergekit equivalent). doc: the README catalog's line.
    """

    name: str
    params: tuple[str, ...]
    inputs: str
    mask: str | None
    consensus: bool
    normalize: bool
    linear_in_weights: bool
    mergekit: str | None
    doc: str

    @property
    def by_magnitude(self) -> bool:
        """It selects task-vector entries by magnitude (its cache also holds magnitude tables)."""
        return self.mask in ("magnitude", "outlier")

    @property
    def task_vectors(self) -> bool:
        """It merges task vectors (expert - base), written once per model set."""
        return self.inputs == "task_vectors"


# mergekit's semantics (tests/test_mergekit_parity.py compares the tensors with mergekit-yaml)
METHODS = {m.name: m for m in (
    Method("linear", ("weight",), "experts", None, False, True, True, "linear",
           "weighted average of the models' tensors (normalized by the sum of weights by default)"),
    Method("task_arithmetic", ("weight",), "task_vectors", None, False, False, True, "task_arithmetic",
           "base + sum of weight x task vector (expert - base)"),
    Method("ties", ("weight", "density"), "task_vectors", "magnitude", True, True, False, "ties",
           "task vectors trimmed to the top `density` fraction by magnitude, a sign elected per entry, "
           "agreeing entries averaged (TIES-Merging)"),
    Method("dare_ties", ("weight", "density"), "task_vectors", "dare", True, False, False, "dare_ties",
           "task vectors randomly dropped to `density` and rescaled (DARE), then TIES sign election"),
    Method("dare_linear", ("weight", "density"), "task_vectors", "dare", False, False, False, "dare_linear",
           "DARE-dropped task vectors added with their weights, no sign election"),
    Method("breadcrumbs", ("weight", "density", "gamma"), "task_vectors", "outlier", False, False, False,
           "breadcrumbs", "task vectors without their largest `gamma` and smallest entries (kept `density`), "
                          "added with their weights (Model Breadcrumbs)"),
    Method("breadcrumbs_ties", ("weight", "density", "gamma"), "task_vectors", "outlier", True, False, False,
           "breadcrumbs_ties", "breadcrumbs masks with TIES sign election"),
    Method("slerp", ("t",), "slerp", None, False, False, False, "slerp",
           "spherical interpolation between the base and one expert at t, tensor by tensor"),
)}

# the methods gradient oracles can differentiate, task-vector methods first (as the messages name them)
GRADIENT_METHODS = tuple(sorted((name for name, m in METHODS.items() if m.linear_in_weights),
                                key=lambda name: not METHODS[name].task_vectors))


def method(name: str) -> Method:
    """The table's entry for a method name (ValueError naming the known ones otherwise)."""
    try:
        return METHODS[name]
    except KeyError:
        raise ValueError(f"unknown merge method {name!r}; known: {', '.join(METHODS)}") from None
