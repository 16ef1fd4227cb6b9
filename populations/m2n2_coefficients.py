"""M2N2 in coefficient form: archive members are mixtures of the seed models, piecewise along the
parameter axis, never full copies.

Without mutation, split-point SLERP of two mixtures is again a mixture: a member is a sorted list
of segment starts on a grid of chunks plus one coefficient vector over the S seeds per segment. The
dot products the SLERP angle needs come from per-chunk Gram matrices of the seeds (prefix sums,
computed once), so a member costs O(segments x S) numbers whatever the model's size, and the
children are the same as the dense form's for the same random draws (up to float rounding).
"""
from __future__ import annotations

import numpy as np

from evomerge.errors import UserError

from .base import Candidate, RunContext, SpaceInfo
from .natural_niches import M2N2Config, NaturalNiches, slerp_coefficients


class Member:
    """starts: (n,) first chunk of each segment (starts[0] = 0); coefs: (n, S) seed coefficients."""

    __slots__ = ("starts", "coefs")

    def __init__(self, starts: np.ndarray, coefs: np.ndarray):
        self.starts, self.coefs = np.asarray(starts, np.int64), np.asarray(coefs, np.float64)

    def at(self, starts: np.ndarray) -> np.ndarray:
        """Coefficient rows of the segments containing each chunk in `starts`."""
        return self.coefs[np.searchsorted(self.starts, starts, side="right") - 1]

    def nbytes(self) -> int:
        return self.starts.nbytes + self.coefs.nbytes


def compress(starts: np.ndarray, coefs: np.ndarray) -> Member:
    keep = np.ones(len(starts), bool)
    keep[1:] = np.any(coefs[1:] != coefs[:-1], axis=1)
    return Member(starts[keep], coefs[keep])


class M2N2Coefficients(NaturalNiches):
    """M2N2 (same competition, attraction, draws as the dense form) over coefficient-form members:
    `members` holds one Member per slot (`empty`, the zero model, in an empty one)."""

    def __init__(self, cfg: M2N2Config, space: SpaceInfo, seed: int, run: RunContext):
        if space.layout is not None:
            raise UserError("strategy.form: the coefficients form mixes whole seed models; this space's vector "
                            "is merge coefficients (hf_merge): use space.name: hf_mixture for M2N2 over checkpoints")
        super().__init__(cfg, space, seed, run)
        if self.mutation_std > 0:
            raise UserError("strategy.form: the coefficients form needs mutation_std: 0 (a mutated child "
                            "is no longer a mixture of the seeds)")
        s = len(space.seeds)
        if space.gram is not None:  # hf_mixture: the space's cells are the grid, points are (cells, S) coefficients
            if cfg.chunk_size != 1:
                raise UserError("strategy.chunk_size: a mixture space sets the grid itself (space.chunk_size)")
            gram = np.asarray(space.gram, np.float64)
            self.seed_matrix = None
            self.n_chunks = len(gram)
        else:  # the seeds are the models themselves (dense vectors)
            seeds = np.asarray(space.seeds, np.float64)  # (S, D)
            self.seed_matrix = seeds
            d = seeds.shape[1]
            self.edges = np.append(np.arange(0, d, cfg.chunk_size), d)  # chunk c: [edges[c], edges[c + 1])
            self.n_chunks = len(self.edges) - 1
            gram = np.empty((self.n_chunks, s, s))
            for i in range(s):
                for j in range(i, s):
                    gram[:, i, j] = gram[:, j, i] = np.add.reduceat(seeds[i] * seeds[j], self.edges[:-1])
        self.prefix = np.concatenate([np.zeros((1, s, s)), np.cumsum(gram, axis=0)])  # (C + 1, S, S)

    def _init_archive(self) -> None:
        # no dense copies: members are coefficient lists; an empty slot is the zero model, as the dense
        # form's zero rows (parents may be drawn from it while every score is 0)
        self.empty = Member([0], np.zeros((1, len(self.seed_points))))
        self.members: list[Member] = [self.empty] * self.cfg.archive_size

    # algebra on members ---------------------------------------------------------------------
    def _segments(self, *members: Member, extra: tuple[int, ...] = ()) -> tuple[np.ndarray, np.ndarray]:
        starts = np.unique(np.concatenate([m.starts for m in members] + [np.array(extra, np.int64)]))
        starts = starts[(starts >= 0) & (starts < self.n_chunks)]
        ends = np.append(starts[1:], self.n_chunks)
        return starts, ends

    def dot(self, a: Member, b: Member) -> float:
        starts, ends = self._segments(a, b)
        block = self.prefix[ends] - self.prefix[starts]  # (n, S, S) Gram sums per segment
        return float(np.einsum("ns,nst,nt->", a.at(starts), block, b.at(starts)))

    def cosine(self, a: Member, b: Member) -> float:
        denom = float(np.sqrt(self.dot(a, a) * self.dot(b, b)))
        return self.dot(a, b) / denom if denom > 0 else 1.0

    def crossover(self, a: Member, b: Member, w: float, split: int) -> Member:
        cos = self.cosine(a, b)
        ax, ay = slerp_coefficients(w, cos)
        bx, by = slerp_coefficients(1.0 - w, cos)
        starts, _ = self._segments(a, b, extra=(split,))
        ca, cb = a.at(starts), b.at(starts)
        before = (starts < split)[:, None]
        coefs = np.where(before, ax * ca + ay * cb, bx * ca + by * cb)
        return compress(starts, coefs)

    def materialize(self, m: Member) -> np.ndarray:
        """The point a member stands for: the dense model vector, or in a mixture space its
        per-cell coefficients (the workers build the model from the seeds)."""
        ends = np.append(m.starts[1:], self.n_chunks)
        if self.seed_matrix is None:
            return np.repeat(m.coefs, ends - m.starts, axis=0).astype(np.float32).reshape(-1)
        x = np.empty(self.seed_matrix.shape[1], np.float32)
        for s, e, c in zip(m.starts, ends, m.coefs):
            lo, hi = self.edges[s], self.edges[e]
            x[lo:hi] = c @ self.seed_matrix[:, lo:hi]
        return x

    # the form's hooks ---------------------------------------------------------------------------
    def _seed_tag(self, i: int) -> Member:
        return Member([0], np.eye(len(self.seed_points))[i][None])

    def breed(self, pairs: np.ndarray) -> list[Candidate]:
        n = len(pairs)
        # the dense form's draws, in its order: split over coordinates (here chunks), then w
        split = self.rng.integers(0, self.n_chunks, n) if self.cfg.splitpoint else np.full(n, self.n_chunks)
        w = self.rng.random(n)
        out = []
        for i, (a, b) in enumerate(pairs):
            ma, mb = self.members[a], self.members[b]
            child = self.crossover(ma, mb, float(w[i]), int(split[i])) if self.cfg.crossover else ma
            out.append(self._candidate(self.materialize(child), child))
        return out

    def _store(self, index: int, x: np.ndarray, cand: Candidate | None) -> None:
        self.members[index] = cand.tag

    def _members_state(self) -> dict:
        return {"archive": None,  # the dense form's key, kept: checkpoints read the same
                "members": [None if m is self.empty else (m.starts.copy(), m.coefs.copy()) for m in self.members]}

    def _load_members(self, state: dict) -> None:
        self.members = [self.empty if m is None else Member(*m) for m in state["members"]]

    def spread(self, idx: np.ndarray) -> tuple[float, float]:
        """As the dense form's, in model space: on the union of the members' segments, each member's
        and the centroid's coefficients, squared norms through the per-segment Gram sums."""
        members = [self.members[i] for i in idx]
        starts, ends = self._segments(*members)
        block = self.prefix[ends] - self.prefix[starts]  # (U, S, S)
        coefs = np.stack([m.at(starts) for m in members])  # (n, U, S)
        norms = float(np.einsum("ius,ust,iut->", coefs, block, coefs))
        coefs -= coefs.mean(axis=0)
        return float(np.einsum("ius,ust,iut->", coefs, block, coefs)), norms

    def summary(self) -> dict:
        out = super().summary()
        filled = [m for m in self.members if m is not self.empty]
        segs = [len(m.starts) for m in filled]
        if segs:
            out.update(form="coefficients", chunks=self.n_chunks, segments_mean=float(np.mean(segs)),
                       segments_max=int(max(segs)),
                       bytes_per_member_mean=float(np.mean([m.nbytes() for m in filled])))
            if self.seed_matrix is not None:
                out["dense_bytes_per_member"] = 4 * int(self.seed_matrix.shape[1])
        return out
