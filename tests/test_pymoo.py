"""The pymoo strategy: its ask/tell contract (a generation handed out one by one, told whole), multi-objective
search over the fitness's objectives (NSGA-II improves the front), single-objective GA/DE, failures, the
refusals (a multi-objective algorithm on one objective, unknown kwargs, an unpicklable algorithm), and a
killed run resumed exactly on the in-process engine. Synthetic problems only: seconds."""
import pickle

import numpy as np
import pytest

from commands import synthetic_config
from evomerge.config import validate
from evomerge.engine import InProcessPool, search
from evomerge.errors import UserError
from evomerge.populations import Result, SpaceInfo, build_strategy
from evomerge.populations.pymoo_search import ALGORITHMS, PymooConfig
from evomerge.rundir import RunDir
from test_engine_local import assert_same_run, evals, killed_run, resume, summary_of

DIM = 6
OBJ = ("a_accuracy", "b_accuracy", "c_accuracy")


def box(dim=DIM):
    return SpaceInfo(dim=dim, seeds=(np.full(dim, 0.5, np.float32),), lower=np.zeros(dim), upper=np.ones(dim))


def cfg(**kw):
    return PymooConfig(name="pymoo", **kw)


def targets():
    """Three objectives in [0, 1] that conflict: closeness to three corners of the box."""
    return np.eye(3, DIM)


def metrics(x):
    d = ((np.asarray(x, np.float64)[None, :] - targets()) ** 2).sum(axis=1) / DIM
    return dict(zip(OBJ, map(float, np.exp(-4 * d))))


def result(c, failed=False):
    m = metrics(c.x)
    return Result(c, float("-inf") if failed else float(np.mean(list(m.values()))), metrics={} if failed else m)


def hypervolume(points):
    from pymoo.indicators.hv import HV

    return float(HV(ref_point=np.zeros(3))(-np.asarray(points)))


def run(st, evaluations, batch=5):
    seen = []
    while len(seen) < evaluations:
        cands = st.ask(batch)
        assert cands
        st.tell([result(c) for c in cands])
        seen += [list(metrics(c.x).values()) for c in cands]
    return np.array(seen)


def test_a_generation_is_handed_out_one_by_one_and_told_whole_in_any_order():
    st = build_strategy(cfg(algorithm="ga", pop_size=8), box(), seed=0)
    assert st.generational
    first, rest = st.ask(3), st.ask(10)
    assert len(first) == 3 and len(rest) == 5 and st.ask(4) == []  # the generation is out
    assert {c.cohort for c in first + rest} == {1} and all(c.cohort_size == 8 for c in first)
    assert [c.step for c in first + rest] == list(range(8))
    np.testing.assert_array_equal(first[0].x, np.full(DIM, 0.5, np.float32))  # the space's seed starts it
    results = [result(c) for c in first + rest]
    st.tell(results[::2])
    assert st.ask(4) == []  # half of it told: pymoo is not told yet
    st.tell(results[1::2][::-1])
    nxt = st.ask(8)
    assert len(nxt) == 8 and nxt[0].cohort == 2 and st.algorithm.evaluator.n_eval == 8


def test_the_told_values_do_not_depend_on_the_arrival_order():
    a = build_strategy(cfg(algorithm="nsga2", pop_size=8), box(), seed=0, objectives=OBJ)
    b = build_strategy(cfg(algorithm="nsga2", pop_size=8), box(), seed=0, objectives=OBJ)
    for _ in range(3):
        ca, cb = a.ask(8), b.ask(8)
        a.tell([result(c, failed=i == 2) for i, c in enumerate(ca)])
        b.tell([result(c, failed=i == 2) for i, c in enumerate(cb)][::-1])
    np.testing.assert_array_equal(a.algorithm.pop.get("F"), b.algorithm.pop.get("F"))


def test_nsga2_improves_the_front_over_the_objectives():
    st = build_strategy(cfg(algorithm="nsga2", pop_size=20), box(), seed=1, objectives=OBJ)
    seen = run(st, 400)
    first, final = hypervolume(seen[:20]), hypervolume(-st.algorithm.opt.get("F"))
    assert final > first * 1.2
    assert st.summary()["objectives"] == list(OBJ) and st.summary()["generations"] == 20


def test_auto_is_nsga2_on_several_objectives_and_ga_on_one():
    assert build_strategy(cfg(), box(), seed=0, objectives=OBJ).summary()["pymoo_class"] == "NSGA2"
    single = build_strategy(cfg(), box(), seed=0)
    assert single.summary()["pymoo_class"] == "GA" and single.summary()["objectives"] == ["fitness"]


@pytest.mark.parametrize("algorithm", ["ga", "de", "pso"])
def test_single_objective_algorithms_improve_the_fitness(algorithm):
    st = build_strategy(cfg(algorithm=algorithm, pop_size=16), box(), seed=2)
    target = np.full(DIM, 0.8)
    best = []
    for _ in range(20):
        cands = st.ask(16)
        fit = [-float(np.sum((c.x - target) ** 2)) for c in cands]
        best.append(max(fit))
        st.tell([Result(c, f) for c, f in zip(cands, fit)])
    assert max(best[-5:]) > 0.9 * max(best[:1]) and max(best) > -0.05 and max(best) > best[0] + 0.1


@pytest.mark.parametrize("algorithm", sorted(ALGORITHMS))
def test_every_algorithm_resumes_from_its_state_with_the_same_asks(algorithm):
    objectives = OBJ if ALGORITHMS[algorithm][2] else ()
    a = build_strategy(cfg(algorithm=algorithm, pop_size=8), box(), seed=3, objectives=objectives)
    run(a, 30)
    a.ask(3)  # a generation half handed out when the state is taken
    b = build_strategy(cfg(algorithm=algorithm, pop_size=8), box(), seed=99, objectives=objectives)
    b.load_state_dict(pickle.loads(pickle.dumps(a.state_dict())))
    for _ in range(4):
        xa, xb = a.ask(5), b.ask(5)
        assert [c.tag for c in xa] == [c.tag for c in xb]
        for u, v in zip(xa, xb):
            np.testing.assert_array_equal(u.x, v.x)
        a.tell([result(c) for c in xa])
        b.tell([result(c) for c in xb])


def test_failures_get_the_penalty_or_the_worst_value_told_plus_one():
    st = build_strategy(cfg(algorithm="nsga2", pop_size=4), box(), seed=0, objectives=OBJ)
    cands = st.ask(4)
    told = [result(cands[0]), result(cands[1]), Result(cands[2], -0.25, failed=True), result(cands[3], failed=True)]
    st.tell(told)
    F = st.algorithm.pop.get("F")  # the first generation becomes the population as it is
    worst = np.max([[-v for v in r.metrics.values()] for r in told[:2]], axis=0)
    np.testing.assert_allclose(F[2], [0.25] * 3)  # the engine's failure_penalty on every objective
    np.testing.assert_allclose(F[3], np.maximum(worst, 0.25) + 1)
    single = build_strategy(cfg(algorithm="ga", pop_size=4), box(), seed=0)
    cands = single.ask(4)
    single.tell([Result(c, f) for c, f in zip(cands, [0.5, 0.1])] + [Result(c, float("-inf"), failed=True)
                                                                      for c in cands[2:]])
    np.testing.assert_allclose(np.sort(single.algorithm.pop.get("F")[:, 0]), [-0.5, -0.1, 0.9, 0.9])


# refusals -----------------------------------------------------------------------------------------

def test_a_multi_objective_algorithm_on_one_objective_is_refused():
    with pytest.raises(UserError, match="^strategy.algorithm: nsga3 is multi-objective.*single-objective"):
        build_strategy(cfg(algorithm="nsga3"), box(), seed=0)


def test_the_refusal_comes_before_the_workers_start(tmp_path):
    def no_pool(_):
        raise AssertionError("the workers were started")

    c = validate(synthetic_config(strategy={"name": "pymoo", "algorithm": "moead"}))
    run = RunDir.claim(tmp_path / "r")
    try:
        with pytest.raises(UserError, match="^strategy.algorithm: moead is multi-objective"):
            search(c, run, progress=False, pool=no_pool)
    finally:
        run.close()


@pytest.mark.parametrize("kwargs, match", [
    ({"n_offspring": 4}, r"^config strategy: kwargs.n_offspring: not a parameter of pymoo's NSGA2; did you mean "
                         r"n_offsprings"),
    ({"seed": 4}, r"^config strategy: kwargs.seed: set by the run"),
    ({"ref_dirs": [[1.0, 0.0], [1.0]]}, r"^config strategy: kwargs.ref_dirs: a list of rows"),
])
def test_kwargs_are_checked_when_the_config_is_read(kwargs, match):
    algorithm = "nsga3" if "ref_dirs" in kwargs else "nsga2"
    with pytest.raises(UserError, match=match):
        validate(synthetic_config(strategy={"name": "pymoo", "algorithm": algorithm, "kwargs": kwargs}))


def test_reference_directions_need_one_number_per_objective():
    two = cfg(algorithm="nsga3", kwargs={"ref_dirs": [[1.0, 0.0], [0.5, 0.5], [0.0, 1.0]]})  # read: fine
    assert build_strategy(two, box(), seed=0, objectives=OBJ[:2]).summary()["ref_dirs"] == 3
    with pytest.raises(UserError, match=r"^strategy.kwargs.ref_dirs: rows of 3 numbers \(one per objective\)"):
        build_strategy(two, box(), seed=0, objectives=OBJ)


def test_an_algorithm_that_cannot_be_pickled_mid_run_is_refused_at_start(monkeypatch):
    from evomerge.populations import pymoo_search

    monkeypatch.setitem(pymoo_search.ALGORITHMS, "moead", ("pymoo.algorithms.moo.moead", "MOEAD", True, True))
    with pytest.raises(UserError, match="strategy.algorithm: pymoo's MOEAD cannot be pickled mid-run.*generator"):
        build_strategy(cfg(algorithm="moead"), box(), seed=0, objectives=OBJ)


# the engine ---------------------------------------------------------------------------------------

def moo_config():
    return validate(synthetic_config(
        strategy={"name": "pymoo", "algorithm": "nsga2", "pop_size": 16},
        fitness={"name": "synthetic", "n_tasks": 3}, engine__deterministic=True, budget={"max_evals": 240}))


def test_a_killed_nsga2_run_resumed_repeats_the_uninterrupted_one(tmp_path):
    ref = tmp_path / "ref"
    run = RunDir.claim(ref)
    try:
        search(moo_config(), run, progress=False, pool=InProcessPool)
    finally:
        run.close()
    s = summary_of(ref)
    assert s["strategy"]["pymoo_class"] == "NSGA2" and s["strategy"]["told"] == 240
    assert s["strategy"]["objectives"] == ["task0_accuracy", "task1_accuracy", "task2_accuracy"]
    assert len(s["pareto_front"]["members"]) >= 2
    out = tmp_path / "killed"
    killed_run(out, moo_config(), after=101)
    resume(out)
    assert_same_run(ref, out, n=240)
    assert len(evals(out)) == 240
