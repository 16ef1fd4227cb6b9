"""Evo-Merging's stage 1 by statistics: paired sign tests against the base, Benjamini-Hochberg over the
pool's probes, more examples only for the undecided, the budget, exact resume; and the API fitness
scoring example subsets."""
import pickle

import numpy as np
import pytest

from evomerge.errors import UserError
from evomerge.populations import Result, RunContext, SpaceInfo
from evomerge.populations.evo_merging import EvoMerging, EvoMergingConfig, bh_adjust, bh_reject, sign_test_p

COUNTS = (16, 16, 16)  # three tasks of 16 search examples, as the 32-expert repository's bench
PLANTED = {"e3": (0, 1), "e11": (1, -1), "e20": (2, 1)}  # expert -> (the task it helps, the sign that helps)


def pool(seed, experts=32, max_flips=10, counts=COUNTS):
    """Per-example 0/1 scores of the base and of each expert's probe at +w and -w: a planted expert's
    helping probe fixes most of the base's mistakes on its task, its other probe breaks some of what the
    base got right; a null expert's probes flip up to `max_flips` random examples, each way by a coin."""
    rng = np.random.default_rng(seed)
    n = sum(counts)
    edges = np.concatenate([[0], np.cumsum(counts)])
    base = np.zeros(n)
    for lo, hi in zip(edges[:-1], edges[1:]):
        base[rng.choice(np.arange(lo, hi), (hi - lo) // 4, replace=False)] = 1  # a quarter right
    probes = {}
    for k in range(experts):
        e = f"e{k}"
        for sign in (1, -1):
            s = base.copy()
            if e in PLANTED and PLANTED[e][1] == sign:
                t = PLANTED[e][0]
                wrong = np.nonzero(base[edges[t]:edges[t + 1]] == 0)[0] + edges[t]
                s[wrong[:10]] = 1
            elif e in PLANTED:
                right = np.nonzero(base == 1)[0]
                s[rng.choice(right, 4, replace=False)] = 0
            else:
                for i in rng.choice(n, rng.integers(0, max_flips + 1), replace=False):
                    s[i] = float(rng.random() < 0.5)  # up or down (or unchanged) at random
            probes[(e, sign)] = s
    return base, probes


def make(experts=32, counts=COUNTS, seed=0, **cfg):
    names = [f"e{k}" for k in range(experts)]
    info = SpaceInfo(dim=experts, seeds=(np.zeros(experts, np.float32),), lower=np.full(experts, -1.0),
                     upper=np.full(experts, 1.0), layout=tuple(("all", "weight", e) for e in names))
    run = RunContext(parallelism=4, example_counts=None if counts is None else tuple(counts))
    cfg.setdefault("per_task", False)
    cfg.setdefault("popsize", 6)
    return EvoMerging(EvoMergingConfig(name="evo_merging", **cfg), info, seed, run), names


def score(c, names, base, probes):
    """The synthetic fitness: the candidate's probe's scores on its examples (None: all of them)."""
    nz = np.nonzero(c.x)[0]
    full = base if nz.size == 0 else probes[(names[nz[0]], 1 if c.x[nz[0]] > 0 else -1)]
    if nz.size > 1:  # stage 2: any merge, a score of its own
        full = (np.arange(base.size) % 2).astype(float)
    s = full if c.examples is None else full[c.examples]
    return Result(c, float(s.mean()) if s.size else float("nan"), s.astype(np.float32))


def stage1(st, names, base, probes, batch=7, log=None):
    """Drive stage 1 in batches of `batch`; log: per round, the probes asked and their examples."""
    while st.kept is None:
        cands = st.ask(batch)
        assert cands, "stage 1 stalled"
        if log is not None:
            for c in cands:
                log.setdefault(c.tag[2], []).append(c)
        st.tell([score(c, names, base, probes) for c in cands])
    return st


def full_bh(base, probes, st, q, per_task=False):
    """The reference: every probe scored on every example, the sign test (per task, or pooled), BH at q:
    the kept probes."""
    keys, ps = [], []
    groups = [(0, 16), (16, 32), (32, 48)] if per_task else [(0, 48)]
    for e, v in st.probes[1:]:
        for lo, hi in groups:
            d = (probes[(e, 1 if v > 0 else -1)] - base)[lo:hi]
            keys.append((e, 1 if v > 0 else -1))
            ps.append(sign_test_p(int(np.sum(d > 0)), int(np.sum(d < 0))))
    return {k for k, r in zip(keys, bh_reject(np.array(ps), q)) if r}


def test_sign_test_and_benjamini_hochberg():
    assert sign_test_p(0, 0) == 1.0 and sign_test_p(0, 5) == 1.0
    assert sign_test_p(5, 0) == pytest.approx(1 / 32) and sign_test_p(9, 1) == pytest.approx(11 / 1024)
    assert sign_test_p(3, 3) == pytest.approx(42 / 64)
    p = np.array([0.001, 0.03, 0.02, 0.5, 0.04, 0.9])
    # q = 0.25, m = 6: thresholds 0.042, 0.083, 0.125, 0.167, 0.208, 0.25 for the sorted p-values
    # 0.001, 0.02, 0.03, 0.04, 0.5, 0.9: the step-up rejects the 4 smallest; at q = 0.05 only 0.001
    assert bh_reject(p, 0.25).tolist() == [True, True, True, False, True, False]
    assert bh_reject(p, 0.05).tolist() == [True, False, False, False, False, False]
    adj = bh_adjust(p)
    assert ((adj <= 0.25) == bh_reject(p, 0.25)).all() and ((adj <= 0.05) == bh_reject(p, 0.05)).all()
    assert adj[0] == pytest.approx(0.006) and adj[5] == pytest.approx(0.9)
    assert not bh_reject(np.array([0.2, 0.3]), 0.1).any()


@pytest.mark.parametrize("per_task", [True, False])
@pytest.mark.parametrize("seed", range(5))
def test_stage1_keeps_exactly_the_planted_experts_with_their_signs(seed, per_task):
    base, probes = pool(seed)
    st, names = make(seed=seed, per_task=per_task)
    stage1(st, names, base, probes)
    s = st.summary()
    assert sorted(s["kept"]) == sorted(PLANTED), s["tests"]["significant"]
    assert s["sign"] == {e: PLANTED[e][1] for e in PLANTED}
    t = s["tests"]
    assert t["significant"] == 3 and set(t["probes"]) == {f"e{k}{c}" for k in range(32) for c in "+-"}
    for name, r in t["probes"].items():
        assert r["kept"] == (r["p_adj"] <= 0.1) == (name in {f"{e}{'+' if v > 0 else '-'}"
                                                              for e, (_, v) in PLANTED.items()})
        assert r["p"] == pytest.approx(sign_test_p(r["wins"], r["losses"]))
        if per_task:  # the record of its most significant task, and each task's test
            assert len(r["tasks"]) == 3 and r["p_adj"] == min(x["p_adj"] for x in r["tasks"])
    assert t["hypotheses"] == ("probe x task" if per_task else "probe")
    # the sequential step saved examples (futility drops, early decisions): less than every probe on everything
    assert t["examples_scored"] < 0.8 * t["probe_budget"] and t["probe_budget"] == 65 * 48
    assert "dropped: futility" in {r["decided"] for r in t["probes"].values()}


@pytest.mark.parametrize("seed", range(6))
def test_without_futility_the_decisions_are_bh_on_every_example_and_only_the_undecided_get_more(seed):
    base, probes = pool(100 + seed, max_flips=16)
    st, names = make(seed=seed, fdr=0.2, futility=0)  # futility 0: exactly BH on every example
    log = {}
    stage1(st, names, base, probes, log=log)
    kept_probes = {(e, 1 if v > 0 else -1) for e, v in
                   ((st.probes[j + 1]) for j, r in enumerate(st.tests["probes"].values()) if r["kept"])}
    assert kept_probes == full_bh(base, probes, st, 0.2)
    st2, _ = make(seed=seed, fdr=0.2, futility=0, per_task=True)
    stage1(st2, names, base, probes)
    kept_probes = {(e, 1 if v > 0 else -1) for e, v in
                   ((st2.probes[j + 1]) for j, r in enumerate(st2.tests["probes"].values()) if r["kept"])}
    assert kept_probes == full_bh(base, probes, st2, 0.2, per_task=True)
    # round 1: the base on all 48 examples, every probe on the first slice (a stratified quarter)
    first = log[1]
    assert len(first) == 65 and first[0].tag[1] == 0 and first[0].examples.tolist() == list(range(48))
    sl = first[1].examples
    assert all(np.array_equal(c.examples, sl) for c in first[1:]) and sl.size == 12
    assert [int(np.sum((sl >= 16 * t) & (sl < 16 * (t + 1)))) for t in range(3)] == [4, 4, 4]
    # each later round: only probes that were undecided (their worst-case p not surely kept by BH, their
    # best-case p not surely dropped), each on a new slice, never the base again
    seen = {c.tag[1]: set(c.examples.tolist()) for c in first}
    for r in sorted(log)[1:]:
        # who was undecided after the rounds before r, recomputed from the scores seen so far: BH keeps
        # it with its best-case p (all its unscored examples won where the base was wrong) but not with
        # its worst-case p (all lost where the base was right)
        best, worst = [], []
        for j in range(1, 65):
            e, v = st.probes[j]
            got = np.array(sorted(seen[j]))
            d = probes[(e, 1 if v > 0 else -1)][got] - base[got]
            w, lo = int(np.sum(d > 0)), int(np.sum(d < 0))
            rest = np.setdiff1d(np.arange(48), got)
            best.append(sign_test_p(w + int(np.sum(base[rest] == 0)), lo))
            worst.append(sign_test_p(w, lo + int(np.sum(base[rest] == 1))))
        undecided = {j + 1 for j in range(64)
                     if bh_reject(np.array(best), 0.2)[j] and not bh_reject(np.array(worst), 0.2)[j]}
        asked = {c.tag[1] for c in log[r]}
        assert asked == undecided and 0 not in asked  # exactly the undecided, never the base again
        ex = log[r][0].examples  # one new slice for all of them
        assert all(np.array_equal(c.examples, ex) for c in log[r])
        for c in log[r]:
            assert not seen[c.tag[1]] & set(ex.tolist())
            seen[c.tag[1]] |= set(ex.tolist())
    assert len(log) > 1  # the pool had undecided probes after the first slice


@pytest.mark.parametrize("per_task", [True, False])
def test_fdr_is_controlled_over_many_pools(per_task):
    fdp, power = [], []
    for seed in range(60):
        base, probes = pool(1000 + seed, max_flips=14)
        st, names = make(seed=seed, fdr=0.1, per_task=per_task)
        stage1(st, names, base, probes, batch=65)
        kept = [n for n, r in st.tests["probes"].items() if r["kept"]]
        true = {f"{e}{'+' if v > 0 else '-'}" for e, (_, v) in PLANTED.items()}
        fdp.append(sum(k not in true for k in kept) / max(len(kept), 1))
        power.append(sum(k in true for k in kept) / 3)
    assert np.mean(fdp) <= 0.1 and np.mean(power) == 1.0


def test_budget_is_respected_and_the_undecided_are_decided_on_what_they_have():
    base, probes = pool(7, max_flips=16)
    budget = 48 + 64 * 12 + 200  # the base, a first slice for every probe, then 200 examples
    st, names = make(seed=7, probe_budget=budget, fdr=0.2)
    used = 0
    while st.kept is None:
        cands = st.ask(10)
        used += sum(c.examples.size for c in cands)
        st.tell([score(c, names, base, probes) for c in cands])
    t = st.tests
    assert used == t["examples_scored"] <= budget and t["probe_budget"] == budget
    for r in t["probes"].values():  # decisions: BH over the p-values of the examples each probe has
        assert r["kept"] == (r["p_adj"] <= 0.2)
    assert st.ask(3) and st.es is not None  # stage 2 starts
    with pytest.raises(UserError, match="strategy.probe_budget"):
        make(probe_budget=48 + 64 * 12 - 1)


def test_nothing_significant_keeps_the_single_most_significant_and_max_keep_caps():
    rng = np.random.default_rng(3)
    base = (rng.random(48) < 0.5).astype(float)
    probes = {(f"e{k}", s): base.copy() for k in range(8) for s in (1, -1)}
    probes[("e5", -1)][np.nonzero(base == 0)[0][:3]] = 1  # 3 wins: p = 1/8, not significant among 16
    st, names = make(experts=8, seed=1)
    stage1(st, names, base, probes)
    assert st.summary()["kept"] == ["e5"] and st.summary()["sign"] == {"e5": -1}
    assert st.tests["significant"] == 0
    base, probes = pool(2)
    st, names = make(seed=2, max_keep=2)
    stage1(st, names, base, probes)
    kept = st.summary()["kept"]
    assert len(kept) == 2 and set(kept) <= set(PLANTED) and st.tests["significant"] == 3
    ps = {e: st.tests["probes"][f"{e}{'+' if PLANTED[e][1] > 0 else '-'}"]["p"] for e in PLANTED}
    assert max(ps[e] for e in kept) <= min(ps[e] for e in PLANTED if e not in kept)


def test_without_example_counts_everything_is_scored_at_once_and_tested():
    base, probes = pool(4)
    st, names = make(counts=None, seed=4)
    cands = st.ask(1000)
    assert len(cands) == 65 and not st.ask(1) and all(c.examples is None for c in cands)
    st.tell([score(c, names, base, probes) for c in cands])
    assert sorted(st.summary()["kept"]) == sorted(PLANTED) and st.summary()["rule"] == "test"
    assert st.tests["rounds"] == 1 and all(r["examples"] == 48 for r in st.tests["probes"].values())


def test_rule_gain_and_a_fitness_without_per_example_scores():
    base, probes = pool(5)
    st, names = make(rule="gain", seed=5)
    cands = st.ask(1000)
    assert len(cands) == 65 and all(c.examples is None for c in cands)  # gain: everything at once
    st.tell([score(c, names, base, probes) for c in cands])
    assert st.summary()["rule"] == "gain" and "tests" not in st.summary()
    st, names = make(counts=None, seed=5)  # rule test, but no per-example scores: the gain rule
    cands = st.ask(1000)
    st.tell([Result(c, score(c, names, base, probes).fitness) for c in cands])
    assert st.summary()["rule"] == "gain" and set(PLANTED) <= set(st.summary()["kept"])


def test_failed_probes_are_dropped_and_a_clipped_probe_is_not_made():
    base, probes = pool(6)
    st, names = make(seed=6)
    while st.kept is None:
        cands = st.ask(9)
        res = [score(c, names, base, probes) for c in cands]
        for r in res:
            nz = np.nonzero(r.candidate.x)[0]
            if nz.size and names[nz[0]] == "e3":  # a planted expert whose probes all fail
                r.fitness, r.scores, r.failed = float("-inf"), None, True
        st.tell(res)
    assert sorted(st.summary()["kept"]) == ["e11", "e20"]
    assert not st.tests["probes"]["e3+"]["kept"] and st.tests["probes"]["e3+"]["examples"] == 0
    info = SpaceInfo(dim=3, seeds=(np.zeros(3, np.float32),), lower=np.zeros(3), upper=np.ones(3),
                     layout=tuple(("all", "weight", e) for e in "abc"))
    st = EvoMerging(EvoMergingConfig(name="evo_merging"), info, 0, RunContext(example_counts=(4,)))
    assert len(st.probes) == 4  # the base and +w of each: -w is clipped back to the base


def test_resume_is_exact_in_every_stage_and_generations_end_the_search():
    base, probes = pool(8, max_flips=16)
    st, names = make(seed=8, fdr=0.2, generations=3)
    history = []
    clone = None
    for k in range(200):
        if k in (3, 9, 11, 14, 20):  # mid-round, between rounds, after stage 1, in stage 2
            clone, _ = make(seed=8, fdr=0.2, generations=3)
            clone.load_state_dict(pickle.loads(pickle.dumps(st.state_dict())))
        cands = st.ask(5 if k % 2 else 3)
        if clone is not None:
            twin = clone.ask(5 if k % 2 else 3)
            assert [(c.step, c.tag, None if c.examples is None else c.examples.tolist()) for c in cands] == \
                [(c.step, c.tag, None if c.examples is None else c.examples.tolist()) for c in twin]
            np.testing.assert_array_equal(np.stack([c.x for c in cands]) if cands else np.zeros(0),
                                          np.stack([c.x for c in twin]) if twin else np.zeros(0))
        np.random.standard_normal(3)  # the global RNG is none of its state
        res = [score(c, names, base, probes) for c in cands]
        st.tell(res)
        if clone is not None:
            clone.tell([Result(c, r.fitness, r.scores) for c, r in zip(twin, res)])
        history += cands
        if st.done:
            break
    assert st.done and clone.done and st.gens_done == 3 and not st.ask(4)
    assert clone.summary() == st.summary()
    gens = [c for c in history if c.tag[0] == "cma"]
    assert len(gens) == 18 and {c.cohort for c in gens} == {0, 1, 2} and all(c.cohort_size == 6 for c in gens)


def test_api_fitness_scores_an_example_subset_with_requests_for_it_only(tmp_path, monkeypatch):
    import json
    from types import SimpleNamespace

    import evomerge.fitness.api as api

    for name, n in (("a", 5), ("b", 4)):
        rows = [{"prompt": f"{name}{i}?", "answer": str(i % 2), "split": "train"} for i in range(n + 2)]
        rows.append({"prompt": f"{name}-test", "answer": "0", "split": "test"})
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    prompts = []

    class Completions:
        def create(self, **p):
            prompts.append(p["prompt"])
            text = "1" if int(p["prompt"][1:-1] if p["prompt"][1:-1].isdigit() else 0) % 3 else "0"
            return SimpleNamespace(choices=[SimpleNamespace(text=text, logprobs=None)],
                                   usage=SimpleNamespace(prompt_tokens=3, completion_tokens=1))

    monkeypatch.setattr(api, "_client", lambda cfg, timeout: SimpleNamespace(completions=Completions()))
    cfg = api.APIFitnessConfig(name="api", base_url="http://127.0.0.1:9/v1", cache_size=0, tasks=[
        {"name": "a", "path": str(tmp_path / "a.jsonl"), "kind": "generate", "limit": 5, "weight": 2.0},
        {"name": "b", "path": str(tmp_path / "b.jsonl"), "kind": "generate", "limit": 4}])
    assert api.APIFitness.example_counts(cfg) == [5, 4]  # after limit
    fit = api.APIFitness(cfg)
    f_all, s_all, m_all = fit.evaluate_recipe({"weights": {"x": 1.0}})
    assert s_all.size == 9 and m_all["api_requests"] == 9
    prompts.clear()
    f, s, m = fit.evaluate_recipe({"weights": {"x": 1.0}}, examples=np.array([1, 3, 6]))
    assert prompts == ["a1?", "a3?", "b1?"] and m["api_requests"] == 3
    np.testing.assert_array_equal(s, s_all[[1, 3, 6]])
    assert m["a_accuracy"] == pytest.approx(s_all[[1, 3]].mean()) and m["b_accuracy"] == s_all[6]
    assert f == pytest.approx((2 * s_all[[1, 3]].mean() + s_all[6]) / 3)
    f, s, m = fit.evaluate_recipe({"weights": {"x": 1.0}}, examples=np.array([0, 2]))  # task b: none selected
    assert "b_accuracy" not in m and f == pytest.approx(s_all[[0, 2]].mean()) and s.size == 2
    assert f_all == pytest.approx((2 * s_all[:5].mean() + s_all[5:].mean()) / 3)
    prompts.clear()
    assert set(fit.holdout_recipe({"weights": {"x": 1.0}})) == {"a_test_accuracy", "b_test_accuracy"}
    assert prompts == ["a-test", "b-test"]
    with pytest.raises(ValueError, match="sorted unique"):
        fit.evaluate_recipe({"weights": {"x": 1.0}}, examples=np.array([3, 1]))


# stage 2: CMA-ES over the kept experts through cmaes.GenerationPipeline -------------------------------
def fit2(c, names, base, probes):
    """Probes: the synthetic per-example fitness; stage 2: a smooth function of the merge's weights."""
    if c.tag[0] == "probe":
        return score(c, names, base, probes)
    return Result(c, float(-np.sum((c.x - 0.3) ** 2)))


def at_stage2(seed=0, **cfg):
    base, probes = pool(seed)
    st, names = make(seed=seed, **cfg)
    stage1(st, names, base, probes)
    return st, (names, base, probes)


@pytest.mark.parametrize("popsize", [6, 4])  # 4: pycma's selective mirrors, kept as they were
def test_stage2_without_overlap_makes_the_calls_of_a_plain_pycma_loop(popsize):
    st, ctx = at_stage2(popsize=popsize, overlap=0, generations=6)
    assert st.pipeline.ahead == 0 and bool(st.es.sp.lam_mirr) == (popsize < 6)
    assert st.ranks_used() == st.es.sp.weights.mu
    es = pickle.loads(pickle.dumps(st.es))  # the reference: generational pycma, es.ask() after each es.tell()
    kept = [st.coord[e] for e in st.kept]
    for g in range(6):
        xs = es.ask()
        cands = st.ask(4) + st.ask(4)
        assert len(cands) == popsize and st.ask(4) == []  # nothing more until the generation is told
        assert [(c.tag, c.cohort, c.cohort_size) for c in cands] == [(("cma", g, i), g, popsize)
                                                                     for i in range(popsize)]
        want = np.zeros((popsize, 32), np.float32)
        want[:, kept] = np.clip(np.stack(xs)[:, :len(kept)], -1, 1)
        np.testing.assert_array_equal(np.stack([c.x for c in cands]), want)
        res = [fit2(c, *ctx) for c in cands]
        es.tell(xs, [-r.fitness for r in res])
        st.tell(res[::-1][:3])
        assert st.gens_done == g
        st.tell(res[::-1][3:])
    assert st.done and st.ask(4) == [] and st.gens_done == 6
    np.testing.assert_array_equal(st.es.mean, es.mean)
    s = st.summary()
    assert s["generations"] == 6 and s["overlap"] == 0 and s["popsize"] == popsize
    assert list(s["cma_best_weights"]) == st.kept and st.stats()["generation"] == 6.0


def test_stage2_overlap_keeps_asking_while_a_generation_is_unfinished():
    st, ctx = at_stage2(popsize=4, overlap=2, generations=5)
    assert st.pipeline.ahead == 2 and not st.es.sp.lam_mirr  # mirrors off when overlapping
    assert st.races and st.ranks_used() == st.es.sp.weights.mu == 2
    gens = [st.ask(4) for _ in range(3)]
    assert [len(g) for g in gens] == [4, 4, 4] and st.ask(4) == []  # at most overlap + 1 generations untold
    assert [{(c.cohort, c.cohort_size, c.tag[:2]) for c in g} for g in gens] == [{(k, 4, ("cma", k))}
                                                                              for k in range(3)]
    r = [[fit2(c, *ctx) for c in g] for g in gens]
    st.tell(r[0][:3] + r[1])  # generation 1 complete before 0: told at once, 0 waits for its last
    assert st.gens_done == 1 and st.stats()["stage"] == 2.0
    nxt = st.ask(4)
    assert {c.cohort for c in nxt} == {3} and st.ask(4) == []
    st.tell(r[0][3:] + r[2])
    assert st.gens_done == 3
    last = st.ask(9)
    assert {c.cohort for c in last} == {4} and st.ask(9) == []  # `generations` 5: none sampled past it
    st.tell([fit2(c, *ctx) for c in nxt + last])
    assert st.done and st.gens_done == 5 and st.ask(4) == [] and st.summary()["overlap"] == 2


def test_stage2_default_overlap_is_cmaes_rule_and_stage1_ranks_nothing():
    from evomerge.populations.cmaes import default_overlap

    base, probes = pool(1)
    for parallelism in (1, 4, 16):
        names = [f"e{k}" for k in range(32)]
        info = SpaceInfo(dim=32, seeds=(np.zeros(32, np.float32),), lower=np.full(32, -1.0),
                         upper=np.full(32, 1.0), layout=tuple(("all", "weight", e) for e in names))
        st = EvoMerging(EvoMergingConfig(name="evo_merging", popsize=6, per_task=False), info, 1,
                        RunContext(parallelism=parallelism, example_counts=COUNTS))
        assert st.ranks_used() is None and st.summary().get("overlap") is None
        stage1(st, names, base, probes)
        assert st.pipeline.ahead == default_overlap(parallelism, 6) == {1: 1, 4: 1, 16: 4}[parallelism]


@pytest.mark.parametrize("overlap", [0, 2])
def test_stage2_resume_is_exact_with_candidates_in_flight(overlap):
    cfg = dict(seed=3, popsize=5, overlap=overlap, generations=8)
    st, ctx = at_stage2(**cfg)
    rng = np.random.default_rng(0)
    pending, clone, twin_pending, log = [], None, [], []
    for k in range(300):
        if k in (2, 7, 13):
            clone, _ = make(**cfg)
            clone.load_state_dict(pickle.loads(pickle.dumps(st.state_dict())))
            twin_pending = list(pending)  # the engine tells what was in flight at the checkpoint
        n = int(rng.integers(1, 4))
        cands = st.ask(n)
        pending += [fit2(c, *ctx) for c in cands]
        if clone is not None:
            twin = clone.ask(n)
            assert [(c.step, c.tag, c.cohort) for c in cands] == [(c.step, c.tag, c.cohort) for c in twin]
            if cands:
                np.testing.assert_array_equal(np.stack([c.x for c in cands]), np.stack([c.x for c in twin]))
            twin_pending += [fit2(c, *ctx) for c in twin]
        m = int(rng.integers(0, len(pending) + 1))
        order = rng.permutation(len(pending))  # results arrive in any order
        told, pending = [pending[i] for i in order[:m]], [pending[i] for i in order[m:]]
        st.tell(told)
        if clone is not None:
            byc = {(r.candidate.step): r for r in twin_pending}
            clone.tell([byc.pop(r.candidate.step) for r in told])
            twin_pending = list(byc.values())
        log += cands
        if st.done:
            break
    assert st.done and clone.done and st.gens_done == 8 and not clone.ask(3)
    np.testing.assert_array_equal(st.es.mean, clone.es.mean)
    assert clone.summary() == st.summary()
    if overlap:
        assert max(c.cohort for c in log[:20]) > min(c.cohort for c in log[:20]) + 1  # generations overlapped


def test_stage2_loads_a_checkpoint_from_before_overlap():
    ref, ctx = at_stage2(seed=2, popsize=6, overlap=0)
    ref.tell([fit2(c, *ctx) for c in ref.ask(6)])  # generation 0 told
    sent = ref.ask(4)
    state = ref.state_dict()
    g = ref.pipeline.gens[0]
    old = {k: v for k, v in state.items() if k not in ("pipeline", "popsize", "ahead")}
    old.update(es=pickle.dumps(ref.es), generation=[x.copy() for x in g.xs], gen_fit=list(g.f), gen_sent=g.sent,
               gens_done=1)  # the format before overlap: stage 2 generational, tags ("cma", i)
    st, _ = make(seed=2, popsize=6)  # default overlap: the old run goes on generational all the same
    st.load_state_dict(pickle.loads(pickle.dumps(old)))
    assert st.pipeline.ahead == 0 and st.gens_done == 1 and st.kept == ref.kept
    for c in sent:
        c.tag = ("cma", c.tag[2])
    for a in (ref, st):
        rest = a.ask(4)
        assert len(rest) == 2 and a.ask(4) == []
        a.tell([fit2(c, *ctx) for c in sent + rest])
    np.testing.assert_array_equal(ref.es.mean, st.es.mean)
    np.testing.assert_array_equal(np.stack([c.x for c in ref.ask(6)]), np.stack([c.x for c in st.ask(6)]))
    old["es"], old["kept"] = None, None  # and one from stage 1
    st, _ = make(seed=2, popsize=6)
    st.load_state_dict(old)
    assert st.pipeline is None and st.ahead == 0 and st.ranks_used() is None
