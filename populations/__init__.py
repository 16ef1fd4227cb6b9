"""Search strategies behind one ask/tell interface. Add one: a module plus a line in STRATEGIES."""
from .base import Candidate, Result, SpaceInfo, Strategy
from .cmaes import CMAES, CMAESConfig
from .m2n2 import M2N2, M2N2Config
from .random_search import RandomSearch, RandomSearchConfig

STRATEGIES = {
    "m2n2": (M2N2Config, M2N2),
    "cmaes": (CMAESConfig, CMAES),
    "random": (RandomSearchConfig, RandomSearch),
}


def build_strategy(cfg, space: SpaceInfo, seed: int) -> Strategy:
    return STRATEGIES[cfg.name][1](cfg, space, seed)


__all__ = ["Candidate", "Result", "SpaceInfo", "Strategy", "STRATEGIES", "build_strategy"]
