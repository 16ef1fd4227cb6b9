"""Evo-Merging: black-box merging over a large repository of experts ("Black-box Model Merging for
Language-Model-as-a-Service with Massive Model Repositories"), one coefficient per expert.

Stage 1, sparsity-based denoising by cheap per-expert probes: the base (every weight 0) and each
expert alone at +`probe_weight` (and at -`probe_weight` with `signs: both`; a probe the bounds clip
back to the base is not made). With `rule: test` (the default) an expert is kept when one of its
probes is significantly better than the base, decided by statistics on the per-example scores:

* each probe is compared with the base on the same examples by a one-sided exact sign test: of the
  examples where they differ, how many the probe wins (p = P(Binomial(wins + losses, 1/2) >= wins)).
  For 0/1 scores (correctness, what lm_tasks and the api fitness give) this is the exact McNemar test;
  for continuous scores it is the distribution-free sign test (it ignores magnitudes, so it is weaker
  than a Wilcoxon signed-rank test, but it needs no symmetry and its best / worst cases over unscored
  examples are exact, which the sequential step below relies on). Examples count equally (task
  weights do not enter the test);
* false discoveries are controlled over all the pool's probes by Benjamini-Hochberg at `fdr` (with
  `per_task`, over probes x tasks: each probe tested on each task's examples, an expert kept when one
  of its probes helps one task; off by default: with few examples per task it splits each probe's
  evidence and triples the tests, and on the 32-expert repository it kept fewer relevant experts);
* sequentially: the search examples are cut into `slices` random slices, stratified by task (from the
  run's seed). The base is scored on all of them at once, every probe on the first slice; after each
  round a hypothesis is decided when no outcome of its unscored examples can change its BH decision:
  kept when BH keeps it even if all its unscored examples went against it (every p at its worst
  case), dropped when BH drops it even if all went its way (every p at its best case; with 0/1
  scores an example the base got right cannot be won, nor one it got wrong lost). With `futility`
  > 0 an undecided one is also dropped when the predictive probability (from its own scores so far,
  a uniform prior on its chances to win and to lose) that its p on all its examples reaches `fdr`
  is below `futility`. Only probes with an undecided hypothesis get the next slice. BH then decides
  on: p on all examples for those scored on all, the worst case for those kept early, 1 for those
  dropped (each at least its full-data p, and a function of its own data given the base: BH's FDR
  control holds as for the full-data p-values). With `futility: 0` the decisions are exactly those
  of BH on every probe scored on every example; futility trades a little power for examples.
  `probe_budget` (examples scored in stage 1, base included; default: what scoring every probe and
  the base on all examples costs) caps it: a probe still undecided when it is spent is decided by BH
  on the p-value of the examples it has.

At most `max_keep` experts are kept (smallest p first); when no probe is significant, the expert of
the probe with the smallest p (ties: the largest mean gain) is kept alone, so stage 2 has something to
scale. The summary records every probe's test (wins, losses, p, BH-adjusted p, examples used).
`rule: gain` is the former rule (keep an expert whose better probe's fitness beats the base's by more
than `min_gain`, everything scored at once); it is also what `rule: test` falls back to for a fitness
without per-example scores. Without `RunContext.example_counts` (a fitness that cannot score subsets)
every probe is scored on everything at once (one round, the same tests).

Stage 2, sign-aware scaling: CMA-ES (pycma) over signed weights of the kept experts only, starting
from each kept expert's better probe sign (`x0: probe`), every other weight held at 0. Its generations
go through cmaes.GenerationPipeline, as CMA-ES's do: with `overlap: k` (default CMA-ES's rule,
ceil(1.5 x parallelism / popsize), at least 1) the next generation is sampled while at most k + 1 are
untold, so workers do not wait for a generation's slowest candidate, each generation told to pycma
whole once complete (pycma's selective mirrors off, as in CMA-ES; the effect on the search is in
populations/cmaes.py's docstring); `overlap: 0` makes the calls of the generational stage 2 before the
option existed. Each generation is one cohort (its number; cohort_size the popsize; the engine may race
it under `scoring`, ranks_used: pycma's mu); `generations` ends the search after that many generations
told (none is sampled past it). A checkpoint from before `overlap` goes on generational.

Works on any space whose layout names one `weight` per expert (api_weights; hf_merge with
task_arithmetic and layer_granularity 0). The kept experts, their tests and signs are in
summary.json's strategy section.
"""
from __future__ import annotations

import math
import pickle
from typing import Literal, Sequence

import numpy as np
from pydantic import Field

from evomerge.errors import UserError
from evomerge.schema import Frozen

from .base import Candidate, Result, RunContext, SpaceInfo, Strategy
from .cmaes import GenerationPipeline, Randn, default_overlap, fit_for_overlap, generational_state


class EvoMergingConfig(Frozen):
    name: Literal["evo_merging"]
    probe_weight: float | None = Field(None, gt=0, description="|weight| of an expert's probe (default: half "
                                                               "the largest |bound|)")
    signs: Literal["both", "positive"] = Field("both", description="probe each expert at +w and -w, or +w only")
    rule: Literal["test", "gain"] = Field(
        "test", description="stage 1's decision: test: a one-sided paired sign test of each probe against the "
                            "base on the same examples, Benjamini-Hochberg over all probes, sequential slices; "
                            "gain: a probe's fitness beats the base's by more than min_gain (also used by test "
                            "for a fitness without per-example scores)")
    per_task: bool = Field(False, description="rule test: test each probe on each task separately (hypotheses: "
                                             "probes x tasks; an expert is kept when one of its probes helps "
                                             "one task significantly), or on all examples pooled")
    fdr: float = Field(0.1, gt=0, lt=1, description="rule test: the false-discovery rate Benjamini-Hochberg "
                                                    "controls over all probes")
    slices: int = Field(4, ge=1, description="rule test: the search examples are cut into this many random "
                                             "slices (stratified by task); undecided probes get one more "
                                             "slice per round")
    futility: float = Field(0.05, ge=0, lt=1, description="rule test: drop an undecided probe when, predicted "
                                                          "from its own scores so far, the chance that its "
                                                          "p-value on all examples reaches fdr is below this "
                                                          "(0: drop only probes that cannot be kept)")
    probe_budget: int | None = Field(None, ge=1, description="rule test: examples scored in stage 1 at most, "
                                                             "base included (default: every probe and the "
                                                             "base on every search example)")
    min_gain: float = Field(0.0, description="rule gain: keep an expert whose better probe beats the base by "
                                             "more than this")
    max_keep: int | None = Field(None, ge=1, description="keep at most this many experts (most significant, "
                                                         "or best gain, first)")
    popsize: int | None = Field(None, ge=2, description="stage-2 CMA-ES population (pycma's default)")
    sigma0: float = Field(0.3, gt=0, description="stage-2 CMA-ES initial step size")
    x0: Literal["probe", "zero"] = Field("probe", description="stage-2 start: each kept expert at its better "
                                                              "probe's signed weight, or all 0")
    generations: int | None = Field(None, ge=1, description="stop after this many stage-2 CMA-ES generations "
                                                            "(default: run until the budget ends)")
    overlap: int | None = Field(
        None, ge=0, description="stage 2: generations sampled ahead while earlier ones finish, as CMA-ES's overlap "
                                "(see populations/cmaes.py); 0: generational (workers idle behind each "
                                "generation); default ceil(1.5 x parallelism / popsize)")


def sign_test_p(wins: int, losses: int) -> float:
    """One-sided exact sign test: P(Binomial(wins + losses, 1/2) >= wins) (1 when no pair differs)."""
    n = wins + losses
    if n == 0 or wins == 0:
        return 1.0
    return sum(math.comb(n, k) for k in range(wins, n + 1)) / 2 ** n


def _log_comb(n: int, k: np.ndarray) -> np.ndarray:
    lg = np.vectorize(math.lgamma)
    return math.lgamma(n + 1) - lg(k + 1) - lg(n - k + 1)


def sign_test_critical(n_max: int, alpha: float) -> np.ndarray:
    """crit[n]: the fewest wins out of n differing pairs whose one-sided sign test p is <= alpha
    (n + 1 when none is)."""
    crit = np.zeros(n_max + 1, np.int64)
    for n in range(n_max + 1):
        k = np.arange(n + 1)
        tail = np.cumsum(np.exp(_log_comb(n, k) - n * math.log(2))[::-1])[::-1]  # P(Bin(n, 1/2) >= k)
        ok = np.nonzero((tail <= alpha * (1 + 1e-9)) & (k > 0))[0]
        crit[n] = ok[0] if ok.size else n + 1
    return crit


def beta_binomial(n: int, a: float, b: float) -> np.ndarray:
    """The Beta-Binomial(n, a, b) probabilities of 0..n."""
    k = np.arange(n + 1)
    lb = np.vectorize(lambda x, y: math.lgamma(x) + math.lgamma(y) - math.lgamma(x + y))
    out = np.exp(_log_comb(n, k) + lb(k + a, n - k + b) - lb(a, b))
    return out / out.sum()


def bh_reject(p: np.ndarray, q: float) -> np.ndarray:
    """Benjamini-Hochberg at level q: which of the p-values are rejected (a boolean mask)."""
    p = np.asarray(p, np.float64)
    m = p.size
    if m == 0:
        return np.zeros(0, bool)
    order = np.argsort(p, kind="stable")
    below = p[order] <= q * np.arange(1, m + 1) / m
    out = np.zeros(m, bool)
    if below.any():
        out[order[:int(np.nonzero(below)[0][-1]) + 1]] = True
    return out


def bh_adjust(p: np.ndarray) -> np.ndarray:
    """Benjamini-Hochberg adjusted p-values (rejected at q exactly when adjusted <= q)."""
    p = np.asarray(p, np.float64)
    m = p.size
    if m == 0:
        return p
    order = np.argsort(p, kind="stable")
    adj = np.minimum.accumulate((p[order] * m / np.arange(1, m + 1))[::-1])[::-1]
    out = np.empty(m)
    out[order] = np.minimum(adj, 1.0)
    return out


class EvoMerging(Strategy):
    generational = True
    races = True  # stage 2's generations (stage 1 picks its probes' examples itself)

    def ranks_used(self) -> int | None:
        """Stage 2: pycma's mu (the parents its update ranks); stage 1: no racing."""
        return None if self.es is None else int(self.es.sp.weights.mu)

    def __init__(self, cfg: EvoMergingConfig, space: SpaceInfo, seed: int, run: RunContext):
        if space.layout is None or space.lower is None:
            raise UserError("strategy.name: evo_merging needs a space with one weight per expert (api_weights, "
                            "or hf_merge with method task_arithmetic and layer_granularity 0)")
        self.coord: dict[str, int] = {}
        for i, (group, param, expert) in enumerate(space.layout):
            if param == "weight":
                if expert in self.coord:
                    raise UserError("strategy.name: evo_merging searches one weight per expert; this space has "
                                    "several per expert (set layer_granularity: 0)")
                self.coord[expert] = i
        if not self.coord:
            raise UserError("strategy.name: evo_merging needs a searched `weight` per expert")
        super().__init__(cfg, space, seed, run)
        self.seed = seed
        self.parallelism = int(run.parallelism)
        self.lower, self.upper = np.asarray(space.lower, np.float64), np.asarray(space.upper, np.float64)
        self.experts = list(self.coord)
        self.base = (self.lower + self.upper) / 2  # what evo_merging does not search (e.g. densities)
        idx = list(self.coord.values())
        self.base[idx] = np.clip(0.0, self.lower[idx], self.upper[idx])
        bound = float(np.max(np.abs(np.concatenate([self.lower[idx], self.upper[idx]]))))
        self.w = cfg.probe_weight if cfg.probe_weight is not None else bound / 2
        base_x = self._point({})
        self.probes: list[tuple[str | None, float]] = [(None, 0.0)] + [
            (e, s * self.w) for e in self.experts for s in ((1, -1) if cfg.signs == "both" else (1,))
            if not np.array_equal(self._point({e: s * self.w}), base_x)]  # clipped back to the base: no probe
        self.counts = None if run.example_counts is None else [int(c) for c in run.example_counts]
        n = int(sum(self.counts)) if self.counts is not None else 0
        self.n_examples = n
        self.budget = cfg.probe_budget if cfg.probe_budget is not None else len(self.probes) * max(n, 1)
        if self.counts is not None and cfg.rule == "test":
            rng = np.random.default_rng([int(seed), 0x5E1EC7])
            parts = [np.array_split(off + rng.permutation(c), cfg.slices)
                     for off, c in zip(np.cumsum([0] + self.counts[:-1]), self.counts)]
            self.slice_ix = [np.sort(np.concatenate([p[k] for p in parts])).astype(np.int64)
                             for k in range(cfg.slices)]
            self.slice_ix = [s for s in self.slice_ix if s.size]
            if self.budget < n + (len(self.probes) - 1) * self.slice_ix[0].size:
                raise UserError(f"strategy.probe_budget: {self.budget} examples cannot score the base on all "
                                f"{n} search examples and every probe on a first slice "
                                f"({n + (len(self.probes) - 1) * self.slice_ix[0].size} examples)")
        else:
            self.slice_ix = []
        # stage 1 state
        self.rule: str = cfg.rule
        self.probe_fit: list[float | None] = [None] * len(self.probes)
        self.scores = np.full((len(self.probes), n), np.nan)  # per probe (0: the base), per search example
        self.failed = np.zeros(len(self.probes), bool)
        # the hypotheses: per probe (1..), per group of examples (each task, or all of them pooled)
        if self.counts is not None and cfg.per_task and len(self.counts) > 1:
            edges = np.concatenate([[0], np.cumsum(self.counts)])
            self.groups = [(int(a), int(b)) for a, b in zip(edges[:-1], edges[1:])]
        else:
            self.groups = [(0, n)]
        self.G = len(self.groups)
        # per hypothesis (probe j >= 1, group g at (j - 1) * G + g): 0 undecided, 1 kept early, -1 cannot be
        # kept, -2 dropped by futility, -3 failed
        self.status = np.zeros((len(self.probes) - 1) * self.G, np.int8)
        self.used = 0  # examples scored in stage 1 (requested)
        self.rounds = 0  # rounds of stage 1 asked
        self.queue: list[tuple[int, np.ndarray | None]] = []  # this round's (probe, examples)
        self.sent = 0
        self.pending = 0
        self.asked = 0
        self.seen_scores = False
        self._crit: np.ndarray | None = None  # sign_test_critical (derived, not state)
        self.tests: dict | None = None
        self.kept: list[str] | None = None
        self.gains: dict[str, float] = {}
        self.signs: dict[str, int] = {}
        # stage 2: CMA-ES's generations through a GenerationPipeline (None in stage 1)
        self.pipeline: GenerationPipeline | None = None
        self.popsize = 0
        self.ahead: int | None = cfg.overlap  # stage 2's overlap (None: the default, sized at its start)
        self._plan_first_round()

    @property
    def es(self):
        """Stage 2's pycma instance (None in stage 1)."""
        return None if self.pipeline is None else self.pipeline.es

    @property
    def gens_done(self) -> int:
        """Stage-2 generations told to pycma."""
        return 0 if self.pipeline is None else int(self.pipeline.es.countiter)

    def _point(self, weights: dict[str, float]) -> np.ndarray:
        x = self.base.copy()
        for e, v in weights.items():
            i = self.coord[e]
            x[i] = np.clip(v, self.lower[i], self.upper[i])
        return x.astype(np.float32)

    # stage 1 -----------------------------------------------------------------------------------
    def _plan_first_round(self) -> None:
        if self.slice_ix:
            everything = np.arange(self.n_examples, dtype=np.int64)
            self._queue([(0, everything)] + [(i, self.slice_ix[0]) for i in range(1, len(self.probes))])
        else:
            self._queue([(i, None) for i in range(len(self.probes))])

    def _queue(self, jobs: list[tuple[int, np.ndarray | None]]) -> None:
        self.queue, self.sent, self.pending = jobs, 0, len(jobs)
        self.rounds += 1
        self.used += sum(self.n_examples if ex is None else ex.size for _, ex in jobs)

    def _tally(self) -> dict[str, np.ndarray]:
        """Per hypothesis (probe, group of examples): wins and losses against the base so far; where a
        win / a loss was possible on the examples seen (`win_room`, `lose_room`) and still is on the
        unscored ones (`can_win`, `can_lose`; with 0/1 scores an example the base got right cannot be
        won, nor one it got wrong lost); and the sign test's p now, at the best case and at the worst
        case of the unscored."""
        base = self.scores[0]
        avail = ~np.isnan(base)
        binary = bool(np.all(np.isin(self.scores[~np.isnan(self.scores)], (0.0, 1.0))))
        P, G = len(self.probes) - 1, self.G
        t = {k: np.zeros(P * G, np.int64) for k in ("wins", "losses", "seen", "win_room", "lose_room", "can_win",
                                                     "can_lose")}
        n = self.scores.shape[1]
        for j in range(P):
            s = self.scores[j + 1]
            for g, (lo_, hi_) in enumerate(self.groups):
                grp = np.zeros(n, bool)
                grp[lo_:min(hi_, n) if self.n_examples else n] = True
                seen = grp & avail & ~np.isnan(s)
                rest = grp & avail & np.isnan(s) & ~self.failed[j + 1]
                d = s[seen] - base[seen]
                h = j * G + g
                t["wins"][h], t["losses"][h], t["seen"][h] = np.sum(d > 0), np.sum(d < 0), seen.sum()
                if binary:
                    t["win_room"][h], t["lose_room"][h] = np.sum(base[seen] < 1), np.sum(base[seen] > 0)
                    t["can_win"][h], t["can_lose"][h] = np.sum(base[rest] < 1), np.sum(base[rest] > 0)
                else:
                    t["win_room"][h] = t["lose_room"][h] = seen.sum()
                    t["can_win"][h] = t["can_lose"][h] = rest.sum()
        w, lo = t["wins"], t["losses"]
        t["p"] = np.array([sign_test_p(int(a), int(b)) for a, b in zip(w, lo)])
        t["best"] = np.array([sign_test_p(int(a + c), int(b)) for a, b, c in zip(w, lo, t["can_win"])])
        t["worst"] = np.array([sign_test_p(int(a), int(b + c)) for a, b, c in zip(w, lo, t["can_lose"])])
        out = self.status < 0  # dropped: never kept, p 1 for BH
        t["best"][out] = t["worst"][out] = 1.0
        return t

    def _reach(self, t: dict[str, np.ndarray], h: int) -> float:
        """The predictive probability, from hypothesis h's own scores so far (a uniform prior on the
        probe's chance of winning where it can win, and of losing where it can lose), that its sign test
        on all its examples reaches p <= fdr (the most lenient threshold BH can give)."""
        if self._crit is None:
            self._crit = sign_test_critical(max(self.n_examples, 1), self.cfg.fdr)
        w, lo = int(t["wins"][h]), int(t["losses"][h])
        pw = beta_binomial(int(t["can_win"][h]), 1 + w, 1 + int(t["win_room"][h]) - w)
        pl = beta_binomial(int(t["can_lose"][h]), 1 + lo, 1 + int(t["lose_room"][h]) - lo)
        W, L = np.arange(pw.size)[:, None], np.arange(pl.size)[None, :]
        n = np.minimum(w + lo + W + L, self._crit.size - 1)
        return float(pw @ ((w + W) >= self._crit[n]).astype(np.float64) @ pl)

    def _after_round(self) -> None:
        if self.rule == "gain" or (self.rule == "test" and self._no_scores()):
            self.rule = "gain"
            self._decide_by_gain()
            return
        P = len(self.probes) - 1
        if self.failed[0] or P == 0:
            self._decide_by_test()
            return
        t = self._tally()
        sure_keep, may_keep = bh_reject(t["worst"], self.cfg.fdr), bh_reject(t["best"], self.cfg.fdr)
        st = self.status  # decided hypotheses stay decided
        st[(st == 0) & np.repeat(self.failed[1:], self.G)] = -3
        st[(st == 0) & sure_keep] = 1
        st[(st == 0) & ~may_keep] = -1
        nxt = self.rounds  # slice index of the next round (round r scored slice r - 1)
        if self.cfg.futility > 0 and nxt < len(self.slice_ix):
            for h in np.nonzero(st == 0)[0]:
                if self._reach(t, int(h)) < self.cfg.futility:
                    st[h] = -2
        open_ = [j + 1 for j in range(P) if (st[j * self.G:(j + 1) * self.G] == 0).any()]
        if not open_ or nxt >= len(self.slice_ix):
            self._decide_by_test()
            return
        room = (self.budget - self.used) // len(open_)
        ex = self.slice_ix[nxt][:max(room, 0)]
        if ex.size == 0:
            self._decide_by_test()
            return
        self._queue([(i, ex) for i in open_])

    def _no_scores(self) -> bool:
        return not self.seen_scores  # the fitness gave no per-example scores (nothing to test)

    def _decide_by_test(self) -> None:
        t = self._tally()
        st, G = self.status, self.G
        # what BH decides on, per hypothesis: p on all examples (or, the budget spent, on those it has);
        # the worst case for one kept early; 1 for a dropped one
        p_bh = np.where(st == 1, t["worst"], np.where(st < 0, 1.0, t["p"]))
        keep = bh_reject(p_bh, self.cfg.fdr)
        adj = bh_adjust(p_bh)
        base = self.scores[0]
        how = {1: "kept early", -1: "dropped: cannot be kept", -2: "dropped: futility", -3: "failed"}
        per: dict[str, dict] = {}
        best_probe: dict[str, tuple] = {}
        for j, (e, v) in enumerate(self.probes[1:]):
            s = self.scores[j + 1]
            seen = ~np.isnan(s) & ~np.isnan(base)
            gain = float(np.mean(s[seen] - base[seen])) if seen.any() else float("nan")
            hyp = []
            for g in range(G):
                h = j * G + g
                rest = int(t["can_win"][h] + t["can_lose"][h]) if st[h] == 0 else 0
                hyp.append({"wins": int(t["wins"][h]), "losses": int(t["losses"][h]), "p": float(t["p"][h]),
                            "p_bh": float(p_bh[h]), "p_adj": float(adj[h]), "kept": bool(keep[h]),
                            "decided": how.get(int(st[h]), "budget spent" if rest else "all examples")})
            top = min(range(G), key=lambda g: (adj[j * G + g], p_bh[j * G + g]))
            rec = {**hyp[top], "examples": int(seen.sum()), "gain": round(gain, 6),
                   "kept": any(x["kept"] for x in hyp)}
            if G > 1:
                rec.update(task=top, tasks=hyp)
            per[self._name(j)] = rec
            fit = self.probe_fit[j + 1]
            key = (not rec["kept"], rec["p_bh"], rec["p"], -gain if np.isfinite(gain) else np.inf,
                   -fit if fit is not None and np.isfinite(fit) else np.inf)
            if e not in best_probe or key < best_probe[e][0]:
                best_probe[e] = (key, j)
        self.gains = {e: per[self._name(j)]["gain"] for e, (_, j) in best_probe.items()}
        self.signs = {e: 1 if self.probes[j + 1][1] > 0 else -1 for e, (_, j) in best_probe.items()}
        order = sorted(best_probe, key=lambda e: best_probe[e][0])
        kept = [e for e in order if not best_probe[e][0][0]]
        if self.cfg.max_keep is not None:
            kept = kept[:self.cfg.max_keep]
        self.kept = kept or order[:1]
        self.tests = {"test": "one-sided exact sign test vs the base, Benjamini-Hochberg", "fdr": self.cfg.fdr,
                      "futility": self.cfg.futility, "hypotheses": "probe x task" if G > 1 else "probe",
                      "significant": int(sum(r["kept"] for r in per.values())), "rounds": self.rounds,
                      "examples_scored": int(self.used), "probe_budget": int(self.budget),
                      "base_failed": bool(self.failed[0]), "probes": per}
        self._start_cma()

    def _name(self, j: int) -> str:
        e, v = self.probes[j + 1]
        return f"{e}{'+' if v > 0 else '-'}"

    def _decide_by_gain(self) -> None:
        fit = np.array([f if f is not None and np.isfinite(f) else -np.inf for f in self.probe_fit])
        base = fit[0]
        best: dict[str, tuple[float, int]] = {}
        for (e, v), f in zip(self.probes[1:], fit[1:]):
            if e not in best or f > best[e][0]:
                best[e] = (f, 1 if v > 0 else -1)
        self.gains = {e: float(f - base) if np.isfinite(f) and np.isfinite(base) else float("-inf")
                      for e, (f, _) in best.items()}
        self.signs = {e: s for e, (_, s) in best.items()}
        order = sorted(best, key=lambda e: -self.gains[e])
        kept = [e for e in order if self.gains[e] > self.cfg.min_gain]
        if self.cfg.max_keep is not None:
            kept = kept[:self.cfg.max_keep]
        self.kept = kept or order[:1]
        self._start_cma()

    def _start_cma(self) -> None:
        import cma

        if not self.kept:  # a pool whose every probe is the base (bounds clip them all): scale nothing
            self.kept = self.experts[:1]
            self.signs.setdefault(self.kept[0], 1)
        idx = [self.coord[e] for e in self.kept]
        lo, hi = self.lower[idx], self.upper[idx]
        if self.cfg.x0 == "probe":
            x0 = np.array([self.signs[e] * self.w for e in self.kept])
        else:
            x0 = np.zeros(len(idx))
        x0 = np.clip(x0, lo + 1e-9 * (hi - lo), hi - 1e-9 * (hi - lo))
        opts = {"bounds": [list(lo), list(hi)], "seed": int(self.seed) + 1, "verbose": -9,
                "randn": Randn(int(self.seed) + 1)}  # sampling state in es (pickled), not numpy's global
        if self.cfg.popsize:
            opts["popsize"] = self.cfg.popsize
        if len(idx) == 1:  # pycma needs two dimensions: a dummy coordinate, ignored
            x0, opts["bounds"] = np.append(x0, 0.0), [list(lo) + [-1.0], list(hi) + [1.0]]
        es = cma.CMAEvolutionStrategy(list(x0), self.cfg.sigma0, opts)
        self.popsize = int(es.popsize)
        ahead = self.ahead if self.ahead is not None else default_overlap(self.parallelism, self.popsize)
        es, ahead = fit_for_overlap(es, list(x0), self.cfg.sigma0, opts, ahead, explicit=self.ahead is not None)
        self.pipeline = GenerationPipeline(es, ahead)

    # ask / tell ----------------------------------------------------------------------------------
    def ask(self, n: int) -> list[Candidate]:
        if self.kept is None:
            k = min(n, len(self.queue) - self.sent)
            out = []
            for i, ex in self.queue[self.sent:self.sent + k]:
                e, v = self.probes[i]
                out.append(Candidate(x=self._point({} if e is None else {e: v}), step=self.asked,
                                     tag=("probe", i, self.rounds), examples=None if ex is None else ex.copy()))
                self.asked += 1
            self.sent += k
            return out
        p = self.pipeline
        if self.done or (self.cfg.generations is not None and p.sampled >= self.cfg.generations
                         and all(g.sent == len(g.xs) for g in p.gens)):
            return []  # no generation sampled past `generations`
        out = []
        for g, i, x in p.ask(n):
            weights = dict(zip(self.kept, x[:len(self.kept)]))
            out.append(Candidate(x=self._point(weights), step=self.asked, tag=("cma", g, i), cohort=g,
                                 cohort_size=self.popsize))
            self.asked += 1
        return out

    def tell(self, results: Sequence[Result]) -> None:
        for r in results:
            stage, i = r.candidate.tag[0], r.candidate.tag[1]
            f = r.fitness if np.isfinite(r.fitness) and not r.failed else None
            if stage == "probe":
                if self.kept is not None or r.candidate.tag[2] != self.rounds:
                    continue  # a stale probe result (not of the round in flight)
                self._tell_probe(i, r, f)
                self.pending -= 1
            else:
                # ("cma", generation, index); ("cma", index): asked before overlap existed (resumed), of
                # the one generation then outstanding
                g, i = r.candidate.tag[1:] if len(r.candidate.tag) == 3 else (self.pipeline.gens[0].index, i)
                self.pipeline.tell(g, i, -f if f is not None else float("inf"))  # pycma minimises
        if self.kept is None and self.pending == 0 and self.sent == len(self.queue):
            self._after_round()

    def _tell_probe(self, i: int, r: Result, f: float | None) -> None:
        if self.probe_fit[i] is None or self.rule == "gain" or not self.slice_ix:
            self.probe_fit[i] = f if f is not None else -np.inf
        if f is None or r.scores is None:
            if f is None:
                self.failed[i] = True
            return
        self.seen_scores = True
        if not self.n_examples:  # no example counts: the scores of everything, in order
            sc = np.asarray(r.scores, np.float64).reshape(-1)
            if self.scores.shape[1] != sc.size:
                self.scores = np.full((len(self.probes), sc.size), np.nan)
            self.scores[i] = sc
            return
        ex = r.examples if r.examples is not None else r.candidate.examples
        ex = np.arange(self.n_examples) if ex is None else np.asarray(ex, np.int64)
        self.scores[i, ex] = np.asarray(r.scores, np.float64).reshape(-1)

    @property
    def done(self) -> bool:
        return self.cfg.generations is not None and self.gens_done >= self.cfg.generations

    def state_dict(self) -> dict:
        return {"rule": self.rule, "probe_fit": list(self.probe_fit), "scores": self.scores.copy(),
                "failed": self.failed.copy(), "status": self.status.copy(), "used": self.used,
                "rounds": self.rounds, "queue": [(i, None if ex is None else ex.copy()) for i, ex in self.queue],
                "sent": self.sent, "pending": self.pending, "asked": self.asked, "seen_scores": self.seen_scores,
                "tests": pickle.loads(pickle.dumps(self.tests)), "kept": self.kept, "gains": dict(self.gains),
                "signs": dict(self.signs), "popsize": self.popsize, "ahead": self.ahead,
                "pipeline": None if self.pipeline is None else self.pipeline.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.rule, self.probe_fit = state["rule"], list(state["probe_fit"])
        self.scores, self.failed = np.array(state["scores"]), np.array(state["failed"])
        self.status, self.used, self.rounds = np.array(state["status"]), state["used"], state["rounds"]
        self.queue = [(i, None if ex is None else np.array(ex)) for i, ex in state["queue"]]
        self.sent, self.pending, self.asked = state["sent"], state["pending"], state["asked"]
        self.seen_scores = state["seen_scores"]
        self.tests = pickle.loads(pickle.dumps(state["tests"]))
        self.kept = state["kept"]
        self.gains, self.signs = dict(state["gains"]), dict(state["signs"])
        if "pipeline" not in state:  # a checkpoint from before stage 2's overlap: that run goes on generational
            pipe = None
            if state["es"] is not None:
                pipe = generational_state(state["es"], state["generation"], state["gen_fit"], state["gen_sent"])
            state = {**state, "popsize": 0 if pipe is None else int(pickle.loads(state["es"]).popsize),
                     "pipeline": pipe, "ahead": 0}
        self.popsize, self.ahead = state["popsize"], state["ahead"]
        self.pipeline = None
        if state["pipeline"] is not None:
            self.pipeline = GenerationPipeline(pickle.loads(state["pipeline"]["es"]), 0)
            self.pipeline.load_state_dict(state["pipeline"])

    def stats(self) -> dict[str, float]:
        """stage (1: probes, 2: CMA-ES over the kept experts), in stage 1 the round and the probes still
        undecided, experts kept, and in stage 2 CMA-ES's sigma, generation and last generation's fitness."""
        out = {"stage": 1.0 if self.es is None else 2.0}
        if self.kept is None:
            out.update(round=float(self.rounds), undecided=float(np.sum(self.status == 0)))
        if self.kept is not None:
            out["kept"] = float(len(self.kept))
        if self.es is not None:
            from .cmaes import cma_stats

            out.update(cma_stats(self.es))
        return out

    def summary(self) -> dict:
        out = {"probe_weight": self.w, "experts": len(self.experts), "rule": self.rule}
        if self.kept is not None:
            out.update(kept=self.kept, probe_gain={e: round(g, 6) for e, g in self.gains.items()},
                       sign={e: self.signs[e] for e in self.kept})
            if self.tests is not None:
                out["tests"] = self.tests
            if self.pipeline is not None:
                out.update(generations=self.gens_done, popsize=self.popsize, overlap=self.pipeline.ahead)
            if self.es is not None and self.es.result.xbest is not None:
                out["cma_best_weights"] = {e: round(float(v), 6) for e, v in zip(self.kept, self.es.result.xbest)}
        return out
