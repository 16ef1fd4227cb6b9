"""M2N2's coefficient form: the same children as the dense form for the same draws, members whose
size does not depend on the model's, exact resume."""
import pickle

import numpy as np
import pytest

from evomerge.errors import UserError
from evomerge.populations import Result, SpaceInfo, build_strategy
from evomerge.populations.m2n2 import M2N2
from evomerge.populations.natural_niches import M2N2Config
from evomerge.populations.m2n2_coefficients import M2N2Coefficients


def digits_like(dim=257, seeds=3):
    rng = np.random.default_rng(0)
    return SpaceInfo(dim=dim, seeds=tuple(rng.standard_normal((seeds, dim)).astype(np.float32)))


def score(x):
    directions = np.random.default_rng(9).standard_normal((40, len(x)))
    s = (directions @ x > 0).astype(np.float64)
    return s


def step(st, n):
    cands = st.ask(n)
    st.tell([Result(c, float(score(c.x).mean()), score(c.x)) for c in cands])
    return cands


def test_coefficient_form_gives_the_dense_children_for_the_same_draws():
    space = digits_like()
    dense = build_strategy(M2N2Config(name="m2n2", archive_size=6), space, seed=4)
    coef = build_strategy(M2N2Config(name="m2n2", archive_size=6, form="coefficients"), space, seed=4)
    assert type(dense) is M2N2 and type(coef) is M2N2Coefficients
    for _ in range(30):
        cd = dense.ask(5)
        xd = [c.x for c in cd]
        cc = coef.ask(5)
        assert len(xd) == len(cc)
        for u, c in zip(xd, cc):
            np.testing.assert_allclose(c.x, u, rtol=1e-5, atol=1e-5)
        # tell both the scores of the dense children: identical archives, identical next draws
        results = [(float(score(u).mean()), score(u)) for u in xd]
        dense.tell([Result(c, f, s) for c, (f, s) in zip(cd, results)])
        coef.tell([Result(c, f, s) for c, (f, s) in zip(cc, results)])
    members = [m for m in coef.members if m is not None]
    for i, m in enumerate(coef.members):
        np.testing.assert_allclose(coef.materialize(m), dense.archive[i], rtol=1e-4, atol=1e-4)
    assert max(len(m.starts) for m in members) > 1  # split-point crossovers made piecewise mixtures


def test_a_member_costs_segments_times_seeds_numbers_not_the_model_size():
    space = digits_like(dim=20_000)
    st = build_strategy(M2N2Config(name="m2n2", archive_size=8, form="coefficients", chunk_size=1000), space, 0)
    for _ in range(40):
        step(st, 4)
    s = st.summary()
    assert s["chunks"] == 20 and s["segments_max"] <= 20
    assert s["bytes_per_member_mean"] <= 20 * (8 + 3 * 8) < s["dense_bytes_per_member"] == 80_000
    state = pickle.loads(pickle.dumps(st.state_dict()))
    other = build_strategy(M2N2Config(name="m2n2", archive_size=8, form="coefficients", chunk_size=1000), space, 1)
    other.load_state_dict(state)
    for u, v in zip(st.ask(4), other.ask(4)):
        np.testing.assert_array_equal(u.x, v.x)


def test_coefficient_form_refuses_mutation_and_merge_spaces():
    space = SpaceInfo(dim=4, seeds=(np.zeros(4, np.float32),), random_seeds=True)
    with pytest.raises(UserError, match="needs mutation_std: 0"):
        build_strategy(M2N2Config(name="m2n2", form="coefficients"), space, 0)
    merge = SpaceInfo(dim=2, seeds=(np.zeros(2, np.float32),), lower=np.zeros(2), upper=np.ones(2),
                      layout=(("all", "weight", "a"), ("all", "weight", "b")))
    with pytest.raises(UserError, match="use space.name: hf_mixture"):
        build_strategy(M2N2Config(name="m2n2", form="coefficients"), merge, 0)
