"""ask/tell contracts shared by all strategies; state round trips give the identical next ask."""
import pickle

import numpy as np
import pytest

from evomerge.errors import UserError
from evomerge.populations import STRATEGIES, Result, RunContext, SpaceInfo, build_strategy
from evomerge.populations.cmaes import CMAES, CMAESConfig

DIM = 12


def space(random_seeds=True):
    rng = np.random.default_rng(5)
    return SpaceInfo(dim=DIM, seeds=tuple(rng.standard_normal((2, DIM)).astype(np.float32)),
                     random_seeds=random_seeds)


def config(name):
    extra = {"cmaes": {"diagonal": True, "popsize": 6}, "random": {"sigma": 1.0},
             "nevergrad": {"budget": 500}}.get(name, {})
    return STRATEGIES[name][0](name=name, **extra)


def score(x):
    """A toy fitness with per-example scores: which of 8 fixed directions x points into."""
    directions = np.random.default_rng(9).standard_normal((8, DIM))
    s = (directions @ x > 0).astype(np.float32)
    return Result(None, float(s.mean()), s)


def drive(strategy, rounds):
    for _ in range(rounds):
        cands = strategy.ask(4)
        results = []
        for c in cands:
            r = score(c.x)
            r.candidate = c
            results.append(r)
        strategy.tell(results)


@pytest.mark.parametrize("name", [n for n in sorted(STRATEGIES)
                                  if n not in ("frank_wolfe", "evo_merging")])  # merge spaces
def test_state_round_trip_gives_the_identical_next_ask(name):
    a = build_strategy(config(name), space(), seed=3)
    drive(a, 10)
    state = pickle.loads(pickle.dumps(a.state_dict()))
    b = build_strategy(config(name), space(), seed=999)  # another seed: the state must carry the RNG
    b.load_state_dict(state)
    for _ in range(3):
        xa, xb = [c.x for c in a.ask(4)], [c.x for c in b.ask(4)]
        assert len(xa) == len(xb)
        for u, v in zip(xa, xb):
            np.testing.assert_array_equal(u, v)
        drive(a, 1)
        drive(b, 1)


@pytest.mark.parametrize("name", [n for n in sorted(STRATEGIES)
                                  if n not in ("frank_wolfe", "evo_merging")])  # merge spaces
def test_search_improves_on_a_toy_problem(name):
    st = build_strategy(config(name), space(), seed=0)
    best = 0.0
    for _ in range(60):
        cands = st.ask(4)
        results = []
        for c in cands:
            r = score(c.x)
            r.candidate = c
            best = max(best, r.fitness)
            results.append(r)
        st.tell(results)
    assert best >= 0.75


def scored(cands):
    out = []
    for c in cands:
        r = score(c.x)
        r.candidate = c
        out.append(r)
    return out


def test_cmaes_without_overlap_is_generational():
    st = CMAES(CMAESConfig(name="cmaes", popsize=6, diagonal=True, overlap=0), space(), seed=0, run=RunContext())
    assert st.generational
    first = st.ask(4)
    rest = st.ask(4)
    assert len(first) == 4 and len(rest) == 2
    assert st.ask(4) == []  # the generation is out: nothing until it is told
    results = scored(first + rest)
    st.tell(results[:3])
    assert st.ask(4) == []
    st.tell(results[3:])
    assert len(st.ask(6)) == 6 and st.es.countiter == 1


def test_cmaes_without_overlap_makes_the_calls_of_a_plain_pycma_loop():
    import cma

    from evomerge.populations.cmaes import Randn

    st = CMAES(CMAESConfig(name="cmaes", popsize=6, x0="zeros", overlap=0), space(), seed=4, run=RunContext(8))
    es = cma.CMAEvolutionStrategy(np.zeros(DIM), 0.1, {"seed": 4, "randn": Randn(4), "verbose": -9, "popsize": 6})
    for _ in range(5):
        xs = es.ask()
        cands = st.ask(4) + st.ask(4)
        np.testing.assert_array_equal(np.stack([c.x for c in cands]), np.stack(xs).astype(np.float32))
        results = scored(cands)
        es.tell(xs, [-r.fitness for r in results])
        st.tell(results[::-1])
    np.testing.assert_array_equal(st.es.mean, es.mean)


def test_cmaes_overlap_samples_ahead_and_tells_each_generation_when_complete():
    st = CMAES(CMAESConfig(name="cmaes", popsize=6, diagonal=True, overlap=2), space(), seed=0, run=RunContext())
    gens = [st.ask(6) for _ in range(3)]
    assert [len(g) for g in gens] == [6, 6, 6] and st.ask(6) == []  # at most overlap + 1 generations untold
    assert [{(c.cohort, c.cohort_size, c.step) for c in g} for g in gens] == [{(k, 6, k)} for k in range(3)]
    r = [scored(g) for g in gens]
    st.tell(r[0][:5] + r[1])  # generation 1 is complete before 0: told at once, 0 waits for its last
    assert st.es.countiter == 1
    nxt = st.ask(6)
    assert len(nxt) == 6 and {c.cohort for c in nxt} == {3} and st.ask(6) == []
    st.tell(r[0][5:])
    assert st.es.countiter == 2 and len(st.ask(3)) == 3
    st.tell(r[2] + scored(nxt))
    assert st.es.countiter == 4 and st.summary()["overlap"] == 2


def test_cmaes_races_its_generations_on_pycmas_mu():
    st = CMAES(CMAESConfig(name="cmaes", popsize=8, diagonal=True), space(), seed=0, run=RunContext())
    assert st.races and st.ranks_used() == st.es.sp.weights.mu == 4


def test_cmaes_default_overlap_is_sized_from_the_parallelism():
    def ahead(parallelism, popsize):
        cfg = CMAESConfig(name="cmaes", popsize=popsize, diagonal=True)
        return CMAES(cfg, space(), seed=0, run=RunContext(parallelism=parallelism)).pipeline.ahead

    assert ahead(16, 8) == 3 and ahead(8, 8) == 2 and ahead(6, 12) == 1 and ahead(1, 6) == 1


@pytest.mark.parametrize("popsize,options", [(4, {}), (8, {}), (4, {"CMA_mirrors": 1})])
def test_cmaes_overlap_survives_any_completion_order(popsize, options):
    # popsize 4: pycma would mirror (off by default with overlap); CMA_mirrors set: on, unused mirrors dropped
    st = CMAES(CMAESConfig(name="cmaes", popsize=popsize, overlap=3, options=options), space(), seed=1,
               run=RunContext())
    assert bool(st.es.sp.lam_mirr) == bool(options)
    rng = np.random.default_rng(0)
    pending = []
    for _ in range(200):
        pending += scored(st.ask(int(rng.integers(1, 4))))
        rng.shuffle(pending)
        k = int(rng.integers(0, len(pending) + 1))
        st.tell(pending[:k])
        pending = pending[k:]
    assert st.es.countiter > 20 and np.all(np.isfinite(st.es.mean))


def test_cmaes_loads_a_checkpoint_from_before_overlap():
    cfg = CMAESConfig(name="cmaes", popsize=6, diagonal=True)
    ref = CMAES(cfg.model_copy(update={"overlap": 0}), space(), seed=2, run=RunContext())
    drive(ref, 2)  # generation 0 told
    sent = ref.ask(4)
    g = ref.pipeline.gens[0]
    old = {"es": pickle.dumps(ref.es), "generation": [x.copy() for x in g.xs], "fitness": list(g.f), "sent": g.sent}
    st = CMAES(cfg, space(), seed=9, run=RunContext(parallelism=16))
    st.load_state_dict(pickle.loads(pickle.dumps(old)))
    assert st.pipeline.ahead == 0  # that run resumes as it began, generational
    for c in sent:  # asked by the old code: tags were bare indices
        c.tag = c.tag[1]
    for a in (ref, st):
        rest = a.ask(4)
        assert len(rest) == 2 and a.ask(4) == []
        a.tell(scored(sent + rest))
    np.testing.assert_array_equal(ref.es.mean, st.es.mean)
    np.testing.assert_array_equal(np.stack([c.x for c in ref.ask(6)]), np.stack([c.x for c in st.ask(6)]))


def test_cmaes_overlap_refuses_tpa_and_the_default_overlap_falls_back_to_generational():
    from cma.sigma_adaptation import CMAAdaptSigmaTPA

    with pytest.raises(UserError, match="strategy.overlap: this step-size adaptation"):
        CMAES(CMAESConfig(name="cmaes", popsize=6, overlap=2, options={"AdaptSigma": CMAAdaptSigmaTPA}), space(),
              seed=0, run=RunContext())
    st = CMAES(CMAESConfig(name="cmaes", popsize=6, options={"AdaptSigma": CMAAdaptSigmaTPA}), space(), seed=0,
               run=RunContext(parallelism=8))
    assert st.pipeline.ahead == 0  # TPA (pycma's choice for separable CMA-ES in many dimensions): generational
    CMAES(CMAESConfig(name="cmaes", popsize=6, overlap=0, options={"AdaptSigma": CMAAdaptSigmaTPA}), space(),
          seed=0, run=RunContext())


def test_full_covariance_refused_when_it_cannot_fit():
    with pytest.raises(UserError, match="strategy.diagonal"):
        CMAES.preflight(CMAESConfig(name="cmaes"), dim=2_000_000)
    CMAES.preflight(CMAESConfig(name="cmaes", diagonal=True), dim=2_000_000)  # linear memory: fine


def test_cmaes_bounds_are_respected():
    st = CMAES(CMAESConfig(name="cmaes", popsize=8, sigma0=5.0, bounds=(-1.0, 1.0), x0="center"), space(), seed=0,
               run=RunContext())
    xs = np.stack([c.x for c in st.ask(8)])
    assert xs.min() >= -1 and xs.max() <= 1


def test_cmaes_mean_outside_bounds_is_a_config_error():
    with pytest.raises(UserError, match="^strategy.x0: "):
        CMAES(CMAESConfig(name="cmaes", bounds=(10.0, 11.0)), space(), seed=0, run=RunContext())


def test_nevergrad_unknown_optimizer_is_a_config_error_with_suggestions():
    with pytest.raises(UserError, match=r"strategy.optimizer: 'TwoPointDE' is not a nevergrad optimizer; "
                                        r"did you mean TwoPointsDE"):
        build_strategy(STRATEGIES["nevergrad"][0](name="nevergrad", optimizer="TwoPointDE"), space(), seed=0)


def test_nevergrad_optimizer_that_cannot_be_pickled_is_refused_at_start(monkeypatch):
    import nevergrad as ng

    base = ng.optimizers.registry["OnePlusOne"]

    def unpicklable(*args, **kwargs):
        opt = base(*args, **kwargs)
        opt.callback = lambda: None  # a lambda: pickle refuses it
        return opt

    monkeypatch.setitem(ng.optimizers.registry, "Unpicklable", unpicklable)
    with pytest.raises(UserError, match="strategy.optimizer: Unpicklable cannot be pickled.*choose another"):
        build_strategy(STRATEGIES["nevergrad"][0](name="nevergrad", optimizer="Unpicklable"), space(), seed=0,
                       max_evals=100)


@pytest.mark.parametrize("optimizer", ["NGOpt", "TwoPointsDE", "PSO", "DiagonalCMA"])
def test_nevergrad_optimizers_take_asynchronous_tells(optimizer):
    st = build_strategy(STRATEGIES["nevergrad"][0](name="nevergrad", optimizer=optimizer),
                        SpaceInfo(dim=DIM, seeds=space().seeds, lower=np.full(DIM, -2.0), upper=np.full(DIM, 2.0)),
                        seed=0, parallelism=8, max_evals=200)
    first = st.ask(8)
    assert all(np.all(np.abs(c.x) <= 2.0) for c in first)
    told = []
    for c in first[::2]:  # half the batch returns, then more is asked: nothing waits for a generation
        r = score(c.x)
        r.candidate = c
        told.append(r)
    st.tell(told)
    assert len(st.ask(4)) == 4
    failed = Result(first[1], float("-inf"), None, failed=True)
    st.tell([failed])  # told the worst value seen plus one
    assert st.summary()["told"] == 5


def fw_space(experts=("a", "b", "x1", "x2", "x3"), groups=("layers.0", "layers.1")):
    layout = tuple((g, "weight", e) for g in groups for e in experts)
    n = len(layout)
    return SpaceInfo(dim=n, seeds=(np.full(n, 0.5, np.float32),), lower=np.zeros(n), upper=np.ones(n), layout=layout)


def fw_fitness(info, want):
    """Each (group, expert) coefficient should be want[(group, expert)] (0 where not listed)."""
    target = np.array([want.get((g, e), 0.0) for g, _, e in info.layout])
    return lambda x: -float(np.sum((x - target) ** 2))


def run_fw(cfg, info, f, seed=0):
    st = build_strategy(cfg, info, seed)
    evals = 0
    while not st.done:
        cands = st.ask(100)
        assert cands, "a generational strategy with nothing in flight must ask"
        st.tell([Result(c, f(c.x.astype(np.float64))) for c in cands])
        evals += len(cands)
    return st, evals


def test_frank_wolfe_taskwise_never_moves_toward_irrelevant_models():
    info = fw_space()
    f = fw_fitness(info, {(g, e): 0.4 for g in ("layers.0", "layers.1") for e in ("a", "b")})
    cfg = STRATEGIES["frank_wolfe"][0](name="frank_wolfe", steps=8)
    st, evals = run_fw(cfg, info, f)
    assert evals == 1 + 8 * 5  # theta_0, then one candidate per pool model and step
    chosen = [c for step in st.summary()["chosen"] for c in step]
    assert set(chosen) <= {"a", "b"}
    w = st.summary()["final_mean_weight"]
    assert w["x1"] == w["x2"] == w["x3"] == 0.0 and w["a"] > 0.2 and w["b"] > 0.2
    gammas = [round(1.0 * 2 / (t + 2), 6) for t in range(8)]
    assert [h["gamma"] for h in st.history] == gammas  # gamma_t = step * 2 / (t + 2)


def test_frank_wolfe_layerwise_picks_per_group():
    info = fw_space(experts=("a", "b", "x"))
    f = fw_fitness(info, {("layers.0", "a"): 0.8, ("layers.1", "b"): 0.8})
    cfg = STRATEGIES["frank_wolfe"][0](name="frank_wolfe", mode="layerwise", steps=4)
    st, evals = run_fw(cfg, info, f)
    assert evals == 4 * (1 + 2 * 3) + 1  # each step: the iterate plus group x model moves; the last iterate
    assert st.history[0]["chosen"] == ["layers.0:a", "layers.1:b"]
    theta = dict(zip(info.layout, st.theta))
    assert theta[("layers.0", "weight", "a")] > 0.5 and theta[("layers.0", "weight", "b")] == 0.0


def test_frank_wolfe_state_round_trip_mid_step_and_bad_spaces():
    info = fw_space()
    f = fw_fitness(info, {("layers.0", "a"): 0.5})
    cfg = STRATEGIES["frank_wolfe"][0](name="frank_wolfe", steps=5)
    a = build_strategy(cfg, info, 0)
    for _ in range(2):
        a.tell([Result(c, f(c.x)) for c in a.ask(100)])
    half = a.ask(2)
    b = build_strategy(cfg, info, 0)
    b.load_state_dict(pickle.loads(pickle.dumps(a.state_dict())))
    for st in (a, b):
        rest = st.ask(100)
        st.tell([Result(c, f(c.x)) for c in half + rest])
    np.testing.assert_array_equal(a.theta, b.theta)
    with pytest.raises(UserError, match="frank_wolfe needs a merge space"):
        build_strategy(cfg, space(), 0)
    with pytest.raises(UserError, match="strategy.param: 'density' is not searched"):
        build_strategy(STRATEGIES["frank_wolfe"][0](name="frank_wolfe", param="density"), info, 0)


def test_evo_merging_keeps_the_relevant_experts_with_their_signs_and_scales_them():
    import pickle

    from evomerge.populations.evo_merging import EvoMergingConfig

    names = [f"e{i}" for i in range(12)]
    target = {"e2": 0.8, "e5": 0.5, "e7": -0.6}
    info = SpaceInfo(dim=12, seeds=(np.zeros(12, np.float32),), lower=np.full(12, -1.0), upper=np.full(12, 1.0),
                     layout=tuple(("all", "weight", n) for n in names))

    def fitness(x):  # only e2, e5, e7 matter; any weight on the others hurts
        return -sum((x[i] - target.get(n, 0.0)) ** 2 + (0.5 * x[i] ** 2 if n not in target else 0)
                    for i, n in enumerate(names))

    st = build_strategy(EvoMergingConfig(name="evo_merging", popsize=8), info, 0)
    probes = st.ask(100)
    assert len(probes) == 1 + 2 * 12 and not st.ask(1)  # stage 1 is one batch: base + each expert at +-w
    st.tell([Result(c, fitness(c.x)) for c in probes])
    s = st.summary()
    assert sorted(s["kept"]) == ["e2", "e5", "e7"] and s["sign"] == {"e2": 1, "e5": 1, "e7": -1}
    clone = build_strategy(EvoMergingConfig(name="evo_merging", popsize=8), info, 0)
    clone.load_state_dict(pickle.loads(pickle.dumps(st.state_dict())))
    best = -np.inf
    for _ in range(40):
        cands = st.ask(100)
        np.random.standard_normal(7)  # the driver's global numpy RNG is none of the strategy's state
        assert all(np.count_nonzero(c.x) <= 3 for c in cands)  # only the kept experts move
        np.testing.assert_array_equal(np.stack([c.x for c in cands]), np.stack([c.x for c in clone.ask(100)]))
        res = [Result(c, fitness(c.x)) for c in cands]
        st.tell(res)
        clone.tell(res)
        best = max(best, max(r.fitness for r in res))
    assert best > -1e-3
    assert st.summary()["cma_best_weights"] == pytest.approx(target, abs=0.05)


def test_m2n2_from_a_single_seed_without_mutation_is_refused():
    info = SpaceInfo(dim=6, seeds=(np.zeros(6, np.float32),), lower=np.zeros(6), upper=np.ones(6))
    with pytest.raises(UserError, match="strategy.mutation_std: this space has a single seed point"):
        build_strategy(STRATEGIES["m2n2"][0](name="m2n2"), info, 0)
    build_strategy(STRATEGIES["m2n2"][0](name="m2n2", mutation_std=0.05), info, 0)  # with mutation it searches
