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
    """A searched parameter (mergekit's name): its default search range, the values it may take (None: any),
    the value a merge uses where a recipe's group does not give it, and whether it is one value per expert
    (mergekit's per-model parameters) or `shared`: one value per tensor group (mergekit's global parameters,
    which it also takes per tensor). A method may override the search range and validity (`Method.ranges`)."""

    name: str
    search: tuple[float, float]
    valid: tuple[float, float] | None
    unset: float
    shared: bool = False


PARAMS = {p.name: p for p in (
    Param("weight", (0.0, 1.0), None, 1.0),
    Param("density", (0.1, 1.0), (1e-6, 1.0), 1.0),
    Param("gamma", (0.0, 0.05), (0.0, 1.0), 0.01),
    Param("epsilon", (0.0, 0.1), (0.0, 1.0), 0.15),  # DELLA: keep probabilities density -/+ epsilon by rank
    Param("t", (0.0, 1.0), (0.0, 1.0), 0.5, shared=True),
    Param("select_topk", (0.1, 1.0), (0.0, 1.0), 1.0, shared=True),  # SCE: share of entries kept by variance
    Param("r", (0.0, 0.5), (0.0, None), 0.1, shared=True),  # RAM+: the rescale strength
    Param("alpha", (0.0, 0.5), (0.0, None), 0.2, shared=True),  # RAM+: the cap of the overlap ratio
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
    kernel: "slice" (the elementwise slice kernels of `kernels.py`) or "tensor" (a per-tensor implementation of
    `tensor_methods.IMPLEMENTATIONS`, which reads inputs "base_experts": the base and every expert, raw).
    ranges: (param, search range, valid (low, high; None: unbounded)) overriding `PARAMS` for this method.
    options: (mergekit's name, default) of the method's settings that are not searched (space.options).
    experts: (fewest, most) experts the method merges (most None: any number).
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
    kernel: str = "slice"
    ranges: tuple[tuple[str, tuple[float, float], tuple[float | None, float | None] | None], ...] = ()
    options: tuple[tuple[str, bool | int | float], ...] = ()
    experts: tuple[int, int | None] = (1, None)

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

_TENSOR = dict(inputs="base_experts", mask=None, consensus=False, normalize=False, linear_in_weights=False,
               kernel="tensor")
METHODS.update({m.name: m for m in (
    Method("della", ("weight", "density", "epsilon"), mergekit="della", options=(("rescale", True),),
           **{**_TENSOR, "consensus": True, "normalize": True},
           doc="task vectors pruned at random with keep probabilities density -/+ epsilon by magnitude rank "
               "within each row (DELLA's MagPrune), rescaled to their L1 norm, TIES sign election"),
    Method("della_linear", ("weight", "density", "epsilon"), mergekit="della_linear", options=(("rescale", True),),
           doc="DELLA's MagPrune without sign election: the pruned task vectors added with their weights",
           **_TENSOR),
    Method("sce", ("select_topk",), mergekit="sce", doc="task vectors kept where their variance across experts is "
           "in the top `select_topk` share, weighted by their mean square, TIES-style sign election (SCE)",
           **_TENSOR),
    Method("ram", (), mergekit="ram", options=(("epsilon", 1e-5),),
           doc="task-vector entries changed by one expert added whole, entries changed by several averaged "
               "(Reinforced Agent Merging)", **_TENSOR),
    Method("ramplus_tl", ("r", "alpha"), mergekit="ramplus_tl", options=(("epsilon", 1e-5),),
           doc="RAM with each expert's unique entries scaled by 1 + r x min(overlap ratio, alpha), per tensor",
           **_TENSOR),
    Method("model_stock", (), mergekit="model_stock", options=(("filter_wise", False),), experts=(2, None),
           doc="the experts' average pulled towards the base by the mean angle between their task vectors "
               "(Model Stock)", **_TENSOR),
    Method("nuslerp", ("weight",), mergekit="nuslerp", experts=(2, 2),
           options=(("nuslerp_flatten", True), ("nuslerp_row_wise", False), ("use_base", False)),
           doc="spherical interpolation of two experts (of their task vectors with use_base) at t = w2 / (w1 + w2), "
               "whole tensors or row by row", **_TENSOR),
    Method("multislerp", ("weight",), mergekit="multislerp", experts=(2, None),
           options=(("normalize_weights", True), ("eps", 1e-8), ("use_base", False)),
           doc="the weighted mean of the experts' directions (their task vectors' with use_base) on the hypersphere, "
               "scaled by the weighted mean of their norms (barycentric interpolation)", **_TENSOR),
    Method("karcher", (), mergekit="karcher", options=(("max_iter", 10), ("tol", 1e-5), ("use_base", False)),
           doc="the Riemannian (Karcher) mean of the experts (and the base, with use_base) on the hypersphere, "
               "scaled by their mean norm", **_TENSOR),
    Method("nearswap", ("t",), mergekit="nearswap", experts=(1, 1), ranges=(("t", (0.0, 0.01), (0.0, None)),),
           doc="the base, with each entry moved to the expert's by min(1, t / |expert - base|): entries that "
               "differ by less than t are swapped", **_TENSOR),
    Method("arcee_fusion", (), mergekit="arcee_fusion", experts=(1, 1),
           doc="the base, with the expert's entries where their importance (|difference| x the rows' KL divergence) "
               "passes a dynamic quantile threshold (Arcee Fusion)", **_TENSOR),
)})

# the methods gradient oracles can differentiate, task-vector methods first (as the messages name them)
GRADIENT_METHODS = tuple(sorted((name for name, m in METHODS.items() if m.linear_in_weights),
                                key=lambda name: not METHODS[name].task_vectors))


def param_range(method_name: str, param: str) -> tuple[tuple[float, float], tuple[float | None, float | None] | None]:
    """(default search range, valid values) of a parameter for a method: the method's override, else `PARAMS`."""
    for name, search, valid in METHODS[method_name].ranges:
        if name == param:
            return search, valid
    return PARAMS[param].search, PARAMS[param].valid


def method(name: str) -> Method:
    """The table's entry for a method name (ValueError naming the known ones otherwise)."""
    try:
        return METHODS[name]
    except KeyError:
        raise ValueError(f"unknown merge method {name!r}; known: {', '.join(METHODS)}") from None
