"""The Pareto front over per-task objectives and selection from it by preference weights."""
import numpy as np
import pytest

from evomerge.errors import UserError
from evomerge.pareto import ParetoFront, pareto_mask, parse_preference, preferred


def test_front_keeps_exactly_the_non_dominated_points():
    f = ParetoFront(["a_accuracy", "b_accuracy"])
    pts = {0: (0.5, 0.5), 1: (0.9, 0.1), 2: (0.4, 0.4), 3: (0.1, 0.9), 4: (0.6, 0.6), 5: (0.6, 0.6), 6: (0.9, 0.0)}
    for i, (a, b) in pts.items():
        f.add(i, (a + b) / 2, {"a_accuracy": a, "b_accuracy": b})
    assert sorted(m["eval_id"] for m in f.members) == [1, 3, 4]  # 5 ties 4 (first kept), 0/2/6 dominated
    assert [m["eval_id"] for m in f.sorted()][0] == 4
    assert not f.add(7, 0.0, {"a_accuracy": 1.0})  # an evaluation without every objective is left out


def test_pareto_mask_keeps_the_non_dominated_first_of_equals():
    pts = np.array([[0.5, 0.5], [0.9, 0.1], [0.4, 0.4], [0.1, 0.9], [0.6, 0.6], [0.6, 0.6], [0.9, 0.0]])
    assert list(np.flatnonzero(pareto_mask(pts))) == [1, 3, 4]  # as ParetoFront, above
    assert not pareto_mask(np.zeros((0, 2))).any()


def test_preference_picks_the_largest_weighted_sum_and_names_bad_input():
    f = ParetoFront(["a_accuracy", "b_accuracy"])
    for i, (a, b) in enumerate([(0.9, 0.1), (0.6, 0.6), (0.1, 0.9)]):
        f.add(i, (a + b) / 2, {"a_accuracy": a, "b_accuracy": b})
    assert preferred(f, parse_preference("a=1", f.objectives))["eval_id"] == 0
    assert preferred(f, parse_preference("a=0.5,b_accuracy=0.5", f.objectives))["eval_id"] == 1
    assert preferred(f, parse_preference("a=0.1,b=0.9", f.objectives))["eval_id"] == 2
    with pytest.raises(UserError, match="'c' is not an objective"):
        parse_preference("c=1", f.objectives)
    with pytest.raises(UserError, match="weight of a is not a number"):
        parse_preference("a=x", f.objectives)
