"""M2N2 (populations/natural_niches.py) with archive members as full vectors: the dense form, and the
strategy the registry names "m2n2", which builds the coefficient form (m2n2_coefficients.py) when
the config asks for it."""
from __future__ import annotations

import numpy as np

from evomerge.errors import UserError

from .base import Candidate, RunContext, SpaceInfo, Strategy
from .m2n2_coefficients import M2N2Coefficients
from .natural_niches import M2N2Config, NaturalNiches, slerp_coefficients


def cosine(x: np.ndarray, y: np.ndarray) -> float:
    """Cosine of the angle between two whole parameter vectors (1 when either is zero)."""
    denom = float(np.sqrt(np.dot(x, x) * np.dot(y, y)))
    return float(np.dot(x, y)) / denom if denom > 0 else 1.0


def crossover(x: np.ndarray, y: np.ndarray, w: float, split: int, cos_omega: float) -> np.ndarray:
    """Split-point SLERP: t = w for coordinates < split, 1 - w from split on (one angle for all)."""
    out = np.empty_like(x)
    ax, ay = slerp_coefficients(w, cos_omega)
    bx, by = slerp_coefficients(1.0 - w, cos_omega)
    np.multiply(x[:split], np.float32(ax), out=out[:split])
    out[:split] += np.float32(ay) * y[:split]
    np.multiply(x[split:], np.float32(bx), out=out[split:])
    out[split:] += np.float32(by) * y[split:]
    return out


class M2N2(NaturalNiches):
    """M2N2: model merging with natural niches (Competition and Attraction Improve Model Fusion).

    The dense form: `archive` holds each member's vector (zeros in an empty slot), and the
    members' sum and summed squared norm, so that stats() costs O(dim)."""

    @classmethod
    def build(cls, cfg: M2N2Config, space: SpaceInfo, seed: int, run: RunContext) -> Strategy:
        if cfg.form == "coefficients":
            return M2N2Coefficients(cfg, space, seed, run)
        return cls(cfg, space, seed, run)

    def __init__(self, cfg: M2N2Config, space: SpaceInfo, seed: int, run: RunContext):
        if cfg.form != "dense":
            raise ValueError(f"M2N2 is the dense form, not form: {cfg.form} (M2N2.build picks the form)")
        if space.gram is not None:
            raise UserError("strategy.form: a mixture space (hf_mixture) is searched by M2N2 in form: coefficients "
                            "(the dense form would interpolate coefficients, not models)")
        super().__init__(cfg, space, seed, run)
        if len(self.seed_points) == 1 and self.mutation_std == 0:
            raise UserError("strategy.mutation_std: this space has a single seed point, and M2N2 without mutation "
                            "only recombines its seeds, so every child would be that point; set mutation_std > 0, "
                            "or merge checkpoints with space hf_mixture and form: coefficients")

    def _init_archive(self) -> None:
        self.archive = np.zeros((self.cfg.archive_size, self.dim), np.float32)
        self._reset_sums()

    def _seed_tag(self, i: int) -> None:
        return None

    def breed(self, pairs: np.ndarray) -> list[Candidate]:
        return [self._candidate(child) for child in self.make_children(pairs)]

    def make_children(self, pairs: np.ndarray) -> np.ndarray:
        """Crossover (split-point SLERP) of each pair, plus Gaussian mutation when enabled."""
        n, d = len(pairs), self.dim
        split = self.rng.integers(0, d, n) if self.cfg.splitpoint else np.full(n, d)
        w = self.rng.random(n)
        if self.mutation_std > 0:
            import torch

            out = torch.randn((n, d), generator=self.noise).numpy()
            out *= np.float32(self.mutation_std)
        else:
            out = np.zeros((n, d), np.float32)
        for i, (a, b) in enumerate(pairs):
            xa, xb = self.archive[a], self.archive[b]
            if self.cfg.crossover:
                out[i] += crossover(xa, xb, float(w[i]), int(split[i]), cosine(xa, xb))
            else:
                out[i] += xa
        return out

    def _reset_sums(self) -> None:
        """Sum and summed squared norm of the members (float64), kept up to date by _store, so that
        stats() costs O(dim), not O(members x dim)."""
        self.member_sum = self.archive.sum(axis=0, dtype=np.float64)
        self.member_sumsq = float(np.einsum("ij,ij->", self.archive, self.archive, dtype=np.float64))

    def _store(self, index: int, x: np.ndarray, cand: Candidate | None) -> None:
        old = self.archive[index].astype(np.float64)  # zeros in an empty slot
        self.member_sum -= old
        self.member_sumsq -= float(np.einsum("i,i->", old, old))
        self.archive[index] = x
        new = self.archive[index].astype(np.float64)
        self.member_sum += new
        self.member_sumsq += float(np.einsum("i,i->", new, new))

    def _members_state(self) -> dict:
        return {"archive": self.archive.copy()}

    def _load_members(self, state: dict) -> None:
        self.archive = np.array(state["archive"], np.float32)
        self._reset_sums()

    def _occupied(self) -> np.ndarray:
        """Older checkpoints: a slot with a score or a nonzero vector."""
        return super()._occupied() | self.archive.any(axis=1)

    def spread(self, idx: np.ndarray) -> tuple[float, float]:
        """(sum_i |x_i - centroid|^2, sum_i |x_i|^2) over the members idx (all filled slots; empty
        ones hold zeros), from the running sums: sum |x_i|^2 - |sum x_i|^2 / n, O(dim).

        einsum, not a BLAS dot: OpenBLAS's threaded ddot waits milliseconds per call for the cores
        the workers keep busy."""
        s = self.member_sum
        return max(0.0, self.member_sumsq - float(np.einsum("i,i->", s, s)) / len(idx)), self.member_sumsq
