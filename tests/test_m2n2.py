"""M2N2's formulas on hand-made score matrices, and its crossover."""
import numpy as np
import pytest

from evomerge.populations import Candidate, Result, RunContext, SpaceInfo
from evomerge.populations.m2n2 import M2N2, cosine, crossover
from evomerge.populations.natural_niches import (M2N2Config, attraction, attraction_matrix, competition,
                                                 worst_after_insert)

S = np.array([[1, 1, 0],
              [1, 0, 0],
              [0, 0, 0]], dtype=np.float32)


def test_competition_shares_each_example_among_its_solvers():
    shared, fit = competition(S, alpha=1.0)
    # z = [2, 1, 0 -> 1]: example 0 is shared by two members, example 1 is member 0's alone
    np.testing.assert_allclose(shared, [[0.5, 1, 0], [0.5, 0, 0], [0, 0, 0]])
    np.testing.assert_allclose(fit, [1.5, 0.5, 0.0])


def test_alpha_zero_is_plain_accuracy():
    _, fit = competition(S, alpha=0.0)
    np.testing.assert_allclose(fit, [2, 1, 0])


def test_alpha_two_penalises_crowded_examples_more():
    _, fit = competition(S, alpha=2.0)
    np.testing.assert_allclose(fit, [0.25 + 1, 0.25, 0])


def test_attraction_counts_what_b_solves_where_a_fails():
    shared, _ = competition(S, 1.0)
    np.testing.assert_allclose(attraction(shared, 1), [1.0, 0.0, 0.0])  # member 0 solves example 1
    np.testing.assert_allclose(attraction(shared, 0), [0.0, 0.0, 0.0])  # nobody beats member 0


@pytest.mark.parametrize("binary", [True, False])
def test_attraction_matrix_matches_the_definition(binary):
    rng = np.random.default_rng(0)
    scores = (rng.random((7, 50)) < 0.4).astype(np.float32) if binary else rng.random((7, 50)).astype(np.float32)
    scores[3] = 0
    shared, _ = competition(scores, 1.0)
    expect = np.stack([attraction(shared, a) for a in range(7)])
    np.testing.assert_allclose(attraction_matrix(scores, shared), expect, atol=1e-5)


def test_worst_row_is_dropped_and_a_worst_child_is_refused():
    archive = np.array([[1, 1, 0, 0], [1, 0, 0, 0], [0, 0, 1, 1]], np.float32)
    # a child solving example 1 and 3 makes member 1 (only example 0, shared by three) the worst
    assert worst_after_insert(archive, np.array([1, 1, 0, 1], np.float32), 1.0) == 1
    # a child solving nothing is itself the worst
    assert worst_after_insert(archive, np.zeros(4, np.float32), 1.0) == 3


def _strategy(dim=6, archive=4, seeds=None, **kw):
    seeds = seeds if seeds is not None else (np.ones(dim, np.float32), -np.ones(dim, np.float32))
    return M2N2(M2N2Config(name="m2n2", archive_size=archive, **kw), SpaceInfo(dim=dim, seeds=tuple(seeds)), seed=0,
                run=RunContext())


def _tell(strategy, x, scores):
    c = Candidate(x=np.asarray(x, np.float32), step=strategy.steps)
    strategy.steps += 1
    strategy.tell([Result(c, float(np.mean(scores)), np.asarray(scores, np.float32))])


def test_empty_slots_score_zero_and_fill_first():
    st = _strategy(archive=3)
    st.ask(2)
    st.tell([Result(Candidate(np.full(6, 1, np.float32), 0), 0.5, np.array([1, 0], np.float32)),
             Result(Candidate(np.full(6, 2, np.float32), 1), 0.0, np.array([0, 0], np.float32))])
    # even a child that solves nothing takes an empty slot (ties drop the member, which comes first)
    assert st.inserted == 2
    np.testing.assert_array_equal(st.scores, [[1, 0], [0, 0], [0, 0]])
    _tell(st, np.full(6, 3), [0, 1])
    # the archive was full of zero rows: the first of them (row 1) is replaced
    np.testing.assert_array_equal(st.scores, [[1, 0], [0, 1], [0, 0]])


def test_insert_matches_the_reference_competition():
    rng = np.random.default_rng(1)
    st = _strategy(dim=3, archive=5)
    st.ask(2)
    for step in range(300):
        s = (rng.random(30) < rng.random()).astype(np.float32)
        before = st.scores.copy() if st.scores is not None else np.zeros((5, 30))
        _, fit = competition(np.vstack([before, s[None]]), 1.0)
        _tell(st, rng.random(3), s)
        changed = [i for i in range(5) if not np.array_equal(st.scores[i], before[i])]
        dropped = changed[0] if changed else (5 if np.array_equal(st.scores, before) else None)
        if not changed and any(np.array_equal(before[i], s) for i in range(5)):
            continue  # the child replaced an identical row: nothing observable
        assert dropped is not None and fit[dropped] <= fit.min() + 1e-9
        if dropped == 5:
            assert fit[:5].min() > fit[5]  # on a tie the member goes, not the child
        np.testing.assert_array_equal(st.z, st.scores.sum(axis=0))


def test_parent_b_falls_back_to_fitness_when_nothing_attracts():
    st = _strategy(archive=3)
    st.ask(2)
    _tell(st, np.ones(6), [1, 1, 1, 1])   # member 0 solves everything
    _tell(st, -np.ones(6), [1, 0, 0, 0])  # member 1: nothing member 0 lacks
    pairs = st.draw_parents(4000)
    a0 = pairs[pairs[:, 0] == 0]
    # for A = 0 every g is 0, so B follows fitness f = [1/2+1+1+1, 1/2, 0] -> 7:1, never the empty slot
    assert set(a0[:, 1]) == {0, 1}
    assert abs(np.mean(a0[:, 1] == 0) - 3.5 / 4) < 0.03
    # for A = 1 only member 0 attracts
    assert set(pairs[pairs[:, 0] == 1][:, 1]) == {0}
    assert 2 not in pairs


def test_no_matchmaker_draws_both_parents_by_fitness():
    st = _strategy(archive=3, matchmaker=False)
    st.ask(2)
    _tell(st, np.ones(6), [1, 1, 1, 1])
    _tell(st, -np.ones(6), [1, 0, 0, 0])
    pairs = st.draw_parents(4000)
    assert abs(np.mean(pairs[:, 1] == 0) - 3.5 / 4) < 0.03
    assert 2 not in pairs


def test_crossover_endpoints():
    rng = np.random.default_rng(0)
    x, y = rng.standard_normal(100).astype(np.float32), rng.standard_normal(100).astype(np.float32)
    c = cosine(x, y)
    np.testing.assert_allclose(crossover(x, y, 0.0, 100, c), x, atol=1e-6)  # t = 0 everywhere
    np.testing.assert_allclose(crossover(x, y, 1.0, 100, c), y, atol=1e-6)  # t = 1 everywhere
    np.testing.assert_allclose(crossover(x, y, 1.0, 0, c), x, atol=1e-6)  # split 0: t = 1 - w = 0


def test_crossover_split_takes_each_side_from_one_parent():
    rng = np.random.default_rng(0)
    x, y = rng.standard_normal(100).astype(np.float32), rng.standard_normal(100).astype(np.float32)
    child = crossover(x, y, 1.0, 40, cosine(x, y))
    np.testing.assert_allclose(child[:40], y[:40], atol=1e-6)
    np.testing.assert_allclose(child[40:], x[40:], atol=1e-6)


def test_crossover_uses_one_angle_for_the_whole_vector():
    rng = np.random.default_rng(0)
    x, y = rng.standard_normal(50).astype(np.float32), rng.standard_normal(50).astype(np.float32)
    w, split = 0.3, 20
    omega = np.arccos(cosine(x, y))
    t = np.where(np.arange(50) < split, w, 1 - w)
    expect = np.sin((1 - t) * omega) / np.sin(omega) * x + np.sin(t * omega) / np.sin(omega) * y
    np.testing.assert_allclose(crossover(x, y, w, split, cosine(x, y)), expect, rtol=1e-5, atol=1e-6)


def test_parallel_parents_interpolate_linearly():
    x = np.arange(1, 11, dtype=np.float32)
    child = crossover(x, 3 * x, 0.25, 10, cosine(x, 3 * x))  # sin(omega) = 0
    np.testing.assert_allclose(child, 0.75 * x + 0.25 * 3 * x, rtol=1e-6)


def test_mutation_only_from_random_seeds_by_default():
    seeds = (np.ones(6, np.float32), -np.ones(6, np.float32))
    trained = M2N2(M2N2Config(name="m2n2"), SpaceInfo(6, seeds), 0, RunContext())
    scratch = M2N2(M2N2Config(name="m2n2"), SpaceInfo(6, seeds, random_seeds=True), 0, RunContext())
    assert trained.mutation_std == 0.0 and scratch.mutation_std == 0.01


def test_children_wait_for_the_seeds_scores():
    st = _strategy()
    seeds = st.ask(8)
    assert len(seeds) == 2  # the two seeds first
    assert st.ask(8) == []  # nothing to breed from yet
    st.tell([Result(seeds[1], 0.5, np.array([1.0, 0.0]))])
    assert st.ask(8) == []
    st.tell([Result(seeds[0], 0.5, np.array([0.0, 1.0]))])
    assert len(st.ask(8)) == 8
