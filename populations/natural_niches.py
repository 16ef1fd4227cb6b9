"""M2N2: model merging with natural niches (Competition and Attraction Improve Model Fusion), the part
both forms of an archive member share (populations/m2n2.py: full vectors; m2n2_coefficients.py:
mixtures of the seeds).

The archive keeps `archive_size` members and a [members x examples] score matrix s.
Competition: z_j = sum_k s_kj (0 -> 1), fitness f_i = sum_j s_ij / z_j^alpha; a child is
added as an extra row and the row with the lowest f (the child itself if it is the worst)
is dropped, empty slots scoring 0. Attraction: parent A ~ f / sum f, parent B ~
g(A, B) = sum_j max(0, F_Bj - F_Aj) with F = s / z^alpha. Crossover: SLERP with one angle
over the whole vector, t = w before a random split point and 1 - w after it.
"""
from __future__ import annotations

from abc import abstractmethod
from typing import Literal, Sequence

import numpy as np
from pydantic import Field

from evomerge.schema import Frozen

from .base import Candidate, Result, RunContext, SpaceInfo, Strategy, rng_state, set_rng_state


class M2N2Config(Frozen):
    name: Literal["m2n2"]
    archive_size: int = Field(20, ge=2, description="members kept in the archive")
    alpha: float = Field(1.0, ge=0, description="resource-sharing exponent; 0 is the plain GA")
    matchmaker: bool = Field(True, description="draw parent B by attraction; false: both by fitness")
    crossover: bool = Field(True, description="false: a child is a copy of parent A (then mutated)")
    splitpoint: bool = Field(True, description="t = w before a random split and 1 - w after; false: one t = w")
    mutation_std: float | Literal["auto"] = Field(
        "auto", description="std of the Gaussian mutation; auto: 0.01 from random seeds, 0 from trained ones")
    form: Literal["dense", "coefficients"] = Field(
        "dense", description="archive members as full vectors, or as mixtures of the seeds per segment "
                             "(boundaries plus coefficients: memory independent of the model's size; no mutation)")
    chunk_size: int = Field(1, ge=1, description="coefficients form: coordinates per chunk of the boundary grid")


def competition(scores: np.ndarray, alpha: float) -> tuple[np.ndarray, np.ndarray]:
    """(F, f): shared per-example fitness s / z^alpha and its row sums."""
    z = scores.sum(axis=0)
    z = np.where(z > 0, z, 1.0) ** alpha
    shared = scores / z
    return shared, shared.sum(axis=1)


def attraction(shared: np.ndarray, a: int) -> np.ndarray:
    """g(a, b) for every b: how much b scores where a is weak, sum_j max(0, F_bj - F_aj)."""
    return np.maximum(0.0, shared - shared[a]).sum(axis=1)


def worst_after_insert(scores: np.ndarray, child: np.ndarray, alpha: float) -> int:
    """Index of the row dropped when `child` joins `scores` (len(scores) means the child itself)."""
    _, fit = competition(np.vstack([scores, child[None]]), alpha)
    return int(np.argmin(fit))


def attraction_matrix(scores: np.ndarray, shared: np.ndarray) -> np.ndarray:
    """g[a, b] = attraction(shared, a)[b] for all pairs at once.

    With 0/1 scores, F_bj > F_aj only where a fails (s_aj = 0), and then the term is F_bj;
    so g = (1 - S) F^T, one small matrix product. Other scores take the direct sum.
    """
    if np.all((scores == 0) | (scores == 1)):
        return (1.0 - scores) @ shared.T
    return np.stack([attraction(shared, a) for a in range(len(scores))])


def slerp_coefficients(t: float, cos_omega: float) -> tuple[float, float]:
    """Coefficients (c_x, c_y) of SLERP(t, x, y) = c_x x + c_y y; linear when sin(omega) <= 1e-6."""
    omega = float(np.arccos(np.clip(cos_omega, -1.0, 1.0)))
    s = np.sin(omega)
    if s <= 1e-6:
        return 1.0 - t, t
    return float(np.sin((1.0 - t) * omega) / s), float(np.sin(t * omega) / s)


class NaturalNiches(Strategy):
    """M2N2's archive of scores, competition, attraction and bookkeeping; a subclass says what a
    member is (the hooks below: how the archive starts, how a seed and a child are made, how a
    kept child is stored, checkpointed and measured)."""

    generational = False
    same_examples = True  # the competition compares per-example scores across the archive
    has_archive = True

    def __init__(self, cfg: M2N2Config, space: SpaceInfo, seed: int, run: RunContext):
        super().__init__(cfg, space, seed, run)
        self.dim = space.dim
        self.seed_points = [np.asarray(s, np.float32) for s in space.seeds]
        if len(self.seed_points) < 1:
            raise ValueError("M2N2 needs at least one seed point")
        std = cfg.mutation_std
        self.mutation_std = (0.01 if space.random_seeds else 0.0) if std == "auto" else float(std)
        self.rng = np.random.default_rng(seed)
        import torch  # its normal sampler is twice as fast as numpy's here: noise is most of ask()

        self.noise = torch.Generator().manual_seed(int(self.rng.integers(2**62)))
        self._init_archive()
        self.rows: np.ndarray | None = None  # members' per-example scores plus a row for the newcomer
        self.z: np.ndarray | None = None  # column sums of the members' scores
        self.steps = 0  # candidates handed out
        self.seeds_pending = len(self.seed_points)
        self.seeds_asked = 0
        self.inserted = 0
        self.member_fitness = np.full(cfg.archive_size, np.nan)  # fitness each member was told (stats)
        self.filled = np.zeros(cfg.archive_size, bool)  # slots that received a member

    # what a member is (the forms) ----------------------------------------------------------
    @abstractmethod
    def _init_archive(self) -> None:
        """An archive of `archive_size` empty slots."""

    @abstractmethod
    def _seed_tag(self, i: int):
        """The tag of seed i's candidate (what `_store` keeps of it when it joins the archive)."""

    @abstractmethod
    def breed(self, pairs: np.ndarray) -> list[Candidate]:
        """The children of the (n, 2) parent pairs, as candidates."""

    @abstractmethod
    def _store(self, index: int, x: np.ndarray, cand: Candidate | None) -> None:
        """Put the member x (a candidate that won its place) into slot `index`."""

    @abstractmethod
    def _members_state(self) -> dict:
        """The members, for state_dict."""

    @abstractmethod
    def _load_members(self, state: dict) -> None:
        """The members from a state_dict."""

    @abstractmethod
    def spread(self, idx: np.ndarray) -> tuple[float, float]:
        """(sum_i |x_i - centroid|^2, sum_i |x_i|^2) over the members idx, in model space."""

    def _occupied(self) -> np.ndarray:
        """Slots holding a member, as far as a checkpoint of an older version (no "filled") tells."""
        return np.zeros(self.cfg.archive_size, bool) if self.rows is None else self.scores.any(axis=1)

    # ask ------------------------------------------------------------------------------
    def ask(self, n: int) -> list[Candidate]:
        if self.seeds_asked < len(self.seed_points):
            k = min(n, len(self.seed_points) - self.seeds_asked)
            out = [self._candidate(self.seed_points[i].copy(), self._seed_tag(i))
                   for i in range(self.seeds_asked, self.seeds_asked + k)]
            self.seeds_asked += k
            return out
        if self.seeds_pending or self.scores is None:
            return []  # the archive is filled from the seeds' scores first
        return self.breed(self.draw_parents(n))

    def draw_parents(self, n: int) -> np.ndarray:
        """(n, 2) archive indices: A by fitness, B by attraction to A (or by fitness)."""
        shared, fit = competition(self.scores, self.cfg.alpha)
        p = len(fit)
        cdf = np.cumsum(fit if fit.sum() > 0 else np.ones(p))
        u = self.rng.random((n, 2))
        a = np.minimum(np.searchsorted(cdf, u[:, 0] * cdf[-1], side="right"), p - 1)
        if not self.cfg.matchmaker:
            b = np.minimum(np.searchsorted(cdf, u[:, 1] * cdf[-1], side="right"), p - 1)
            return np.stack([a, b], axis=1)
        g = attraction_matrix(self.scores, shared)
        b = np.empty(n, np.int64)
        for i in range(n):
            row = np.cumsum(g[a[i]])
            if row[-1] <= 0:
                row = cdf  # nobody complements A: fall back to fitness-proportional
            b[i] = min(np.searchsorted(row, u[i, 1] * row[-1], side="right"), p - 1)
        return np.stack([a, b], axis=1)

    def _candidate(self, x: np.ndarray, tag=None) -> Candidate:
        c = Candidate(x=x, step=self.steps, tag=tag)
        self.steps += 1
        return c

    # tell ------------------------------------------------------------------------------
    def tell(self, results: Sequence[Result]) -> None:
        for r in results:
            if r.candidate.step < len(self.seed_points):
                self.seeds_pending -= 1
            if r.failed or r.scores is None:
                continue
            s = np.asarray(r.scores, np.float64).reshape(-1)
            if self.rows is None:
                self.rows = np.zeros((self.cfg.archive_size + 1, s.size))
                self.z = np.zeros(s.size)
            elif s.size != self.scores.shape[1]:
                raise ValueError(f"per-example scores changed length: {s.size} != {self.scores.shape[1]}")
            self.insert(r.candidate.x, s, r.candidate, r.fitness)

    def insert(self, x: np.ndarray, s: np.ndarray, cand: Candidate | None = None,
               fitness: float | None = None) -> bool:
        """Competition for a place in the archive; True when the child was kept.

        As worst_after_insert, with the column sums z kept up to date instead of recomputed:
        the child joins as the last row of `rows` and one product gives every f.
        """
        rows = self.rows
        rows[-1] = s
        z = self.z + s
        fit = rows @ (np.where(z > 0, z, 1.0) ** -self.cfg.alpha)
        worst = int(np.argmin(fit))  # ties drop the member: members come first
        if worst == len(rows) - 1:
            return False
        self.z = z - rows[worst]
        rows[worst] = s
        self.member_fitness[worst] = np.nan if fitness is None else fitness
        self._store(worst, x, cand)
        self.filled[worst] = True
        self.inserted += 1
        return True

    @property
    def scores(self) -> np.ndarray | None:
        """(archive_size, n_examples) per-example scores of the members (0 for empty slots)."""
        return None if self.rows is None else self.rows[:-1]

    # state -----------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {
            **self._members_state(),
            "scores": None if self.rows is None else self.scores.copy(),
            "rng": rng_state(self.rng),
            "noise_rng": self.noise.get_state().numpy().copy(),
            "steps": self.steps,
            "seeds_pending": self.seeds_pending,
            "seeds_asked": self.seeds_asked,
            "inserted": self.inserted,
            "member_fitness": self.member_fitness.copy(),
            "filled": self.filled.copy(),
        }

    def load_state_dict(self, state: dict) -> None:
        self._load_members(state)
        if state["scores"] is None:
            self.rows = self.z = None
        else:
            members = np.asarray(state["scores"], np.float64)
            self.rows = np.vstack([members, np.zeros((1, members.shape[1]))])
            self.z = members.sum(axis=0)
        set_rng_state(self.rng, state["rng"])
        import torch

        self.noise.set_state(torch.from_numpy(np.array(state["noise_rng"], np.uint8)))
        self.steps = state["steps"]
        self.seeds_pending = state["seeds_pending"]
        self.seeds_asked = state["seeds_asked"]
        self.inserted = state["inserted"]
        fit = state.get("member_fitness")  # absent in checkpoints of older versions
        self.member_fitness = np.full(self.cfg.archive_size, np.nan) if fit is None else np.array(fit, np.float64)
        filled = state.get("filled")
        self.filled = np.array(self._occupied() if filled is None else filled, bool)

    @classmethod
    def archive_view(cls, state: dict) -> dict | None:
        """The filled slots' per-example scores and fitness (as told; a member of an older checkpoint
        counts its mean per-example score); None when no member was scored."""
        scores = state.get("scores")
        if scores is None:
            return None
        scores = np.asarray(scores, np.float64)
        filled = state.get("filled")  # slots that received a member (older checkpoints: those scoring something)
        occupied = np.flatnonzero(scores.any(axis=1) if filled is None else np.asarray(filled, bool))
        if not len(occupied):
            return None
        fit = state.get("member_fitness")
        fit = np.full(len(scores), np.nan) if fit is None else np.asarray(fit, np.float64)
        fit = np.where(np.isfinite(fit), fit, scores.mean(axis=1))[occupied]
        return {"scores": scores[occupied], "fitness": fit}

    def summary(self) -> dict:
        if self.scores is None:
            return {}
        acc = self.scores.mean(axis=1)
        covered = self.scores.max(axis=0).mean()
        return {"archive_best_train": float(acc.max()), "archive_mean_train": float(acc.mean()),
                "archive_coverage": float(covered), "children_kept": self.inserted}

    def stats(self) -> dict[str, float]:
        """members; fitness of the members (mean, best: as told; a member of an older checkpoint
        counts its mean per-example score); coverage: mean over examples of the best member's score
        (for 0/1 scores the fraction of examples some member solves); diversity: the RMS distance
        between two members relative to their RMS norm, sqrt(mean over pairs |x_i - x_j|^2 / mean |x_i|^2)
        (0: all equal; about 1.4 for unrelated vectors of equal norm), from `spread`; children kept so far."""
        idx = np.flatnonzero(self.filled)
        out = {"members": float(len(idx)), "children_kept": float(self.inserted)}
        if not len(idx):
            return out
        s = self.scores[idx]
        fit = self.member_fitness[idx]
        fit = np.where(np.isfinite(fit), fit, s.mean(axis=1))
        out.update(archive_mean_fitness=float(fit.mean()), archive_best_fitness=float(fit.max()),
                   coverage=float(s.max(axis=0).mean()))
        if len(idx) > 1:
            n = len(idx)
            spread, norms = self.spread(idx)
            if norms > 0:  # sum over ordered pairs i != j of |x_i - x_j|^2 = 2 n spread
                out["diversity"] = float(np.sqrt(2.0 * spread / (n - 1) / (norms / n)))
        return out
