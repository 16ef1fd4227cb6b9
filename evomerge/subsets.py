"""Which search examples a candidate is scored on: subsets drawn per cohort, racing's first slice, and
racing's stopping rule.

A fitness whose `example_counts` is known can score any subset of its search examples (indices into
the examples of all its tasks, concatenated in config order). Under `scoring.subsample` every cohort
(a generation of a generational strategy, else an ask) gets one subset, drawn from the run's seed and
the cohort's key, so every candidate ranked against the others was scored on the same examples and a
resumed run draws the same ones. The draw is stratified: an ordering of all examples in which every
prefix holds each task in proportion to its size; a subset is a prefix, and racing's first slice is a
prefix of the subset.

Racing (`scoring.race`): each candidate of a cohort is first scored on the slice; once the whole cohort
has (or the run stops asking), a candidate is stopped when at least `keep` others (the part of the
ranking the strategy uses, `Strategy.ranks_used`) are better on all its examples at the configured
confidence, from paired per-example differences on the slice: a normal bound on the mean difference,
with the finite-population correction for a slice drawn without replacement from the examples the
candidate would be scored on, a variance floor for small slices, Bonferroni over the cohort's ordered
pairs. The others are scored on all their examples.
"""
from __future__ import annotations

import hashlib
import math

import numpy as np


class ExamplePlan:
    """The run's subsets: counts (search examples per task), the `scoring` config and the run's seed."""

    def __init__(self, counts: list[int], scoring, seed: int):
        self.counts = [int(c) for c in counts]
        self.total = sum(self.counts)
        self.scoring = scoring
        self.seed = int(seed)
        sub = scoring.subsample
        if sub is None:
            self.k = self.total
        elif sub >= 1:
            self.k = min(int(sub), self.total)
        else:
            self.k = min(self.total, max(len(self.counts), int(round(sub * self.total))))
        self._last: tuple = (None, None)  # the last cohort's draw: its candidates come one after another
        race = scoring.race
        self.m = None
        if race is not None:
            m = max(race.min_first, int(math.ceil(race.first * self.k)))
            self.m = m if m < self.k else None  # a slice as large as the set races nothing

    def order(self, key: int) -> np.ndarray:
        """All example indices in the stratified random order of cohort `key` (fixed by seed and key)."""
        rng = np.random.default_rng([self.seed, 0x5EB5E7, int(key)])
        keys, offset = [], 0
        for n in self.counts:
            rank = np.empty(n)
            rank[rng.permutation(n)] = np.arange(n)
            keys.append((rank + rng.random(n)) / max(n, 1))
            offset += n
        return np.argsort(np.concatenate(keys), kind="stable").astype(np.int64)

    def draw(self, key: int) -> tuple[np.ndarray | None, np.ndarray | None]:
        """(examples, first) of cohort `key`: the subset (None: all examples) and racing's first slice of
        it (None: no racing), both sorted."""
        if self.k >= self.total and self.m is None:
            return None, None
        key = int(key) if self.scoring.resample else 0
        if self._last[0] != key:
            o = self.order(key)
            self._last = (key, (None if self.k >= self.total else np.sort(o[:self.k]),
                                None if self.m is None else np.sort(o[:self.m])))
        return self._last[1]


def examples_id(examples: np.ndarray) -> str:
    """A short identity of an index set (what the run directory's subsets.jsonl keys)."""
    return hashlib.sha256(np.ascontiguousarray(examples, dtype=np.int64).tobytes()).hexdigest()[:16]


def race_stops(first_scores: dict[int, np.ndarray], n_total: int, keep: int, confidence: float,
               cohort_size: int) -> set[int]:
    """The members (by id) to stop: those with at least `keep` others better at `confidence` (see the
    module's docstring). first_scores: id -> the per-example scores on the cohort's first slice (all of
    the same length m, the same examples); n_total: the examples a finished candidate is scored on."""
    ids = sorted(first_scores)
    if len(ids) <= keep:
        return set()
    s = np.stack([np.asarray(first_scores[i], np.float64) for i in ids])
    m = s.shape[1]
    if m < 2:
        return set()
    from scipy.stats import norm

    pairs = max(cohort_size * (cohort_size - 1), 1)
    z = float(norm.ppf(1.0 - (1.0 - confidence) / pairs))
    fpc = math.sqrt(max(n_total - m, 0) / max(n_total - 1, 1))
    spread = float(s.max() - s.min())
    floor = spread * spread / m  # a slice whose differences all agree still leaves this much doubt
    stop = set()
    for a, i in enumerate(ids):
        better = 0
        for b in range(len(ids)):
            if b == a:
                continue
            d = s[b] - s[a]
            var = max(float(d.var(ddof=1)), floor)
            if float(d.mean()) - z * math.sqrt(var / m) * fpc > 0:
                better += 1
                if better >= keep:
                    stop.add(i)
                    break
    return stop
