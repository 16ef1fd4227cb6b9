"""Search strategies behind one ask/tell interface. Add one: a module plus a line in STRATEGIES."""
from .base import Candidate, Result, RunContext, SpaceInfo, Strategy
from .cmaes import CMAES, CMAESConfig
from .evo_merging import EvoMerging, EvoMergingConfig
from .frank_wolfe import FrankWolfe, FrankWolfeConfig
from .m2n2 import M2N2, M2N2Config
from .nevergrad_search import Nevergrad, NevergradConfig
from .pymoo_search import Pymoo, PymooConfig
from .random_search import RandomSearch, RandomSearchConfig

STRATEGIES = {
    "m2n2": (M2N2Config, M2N2),
    "cmaes": (CMAESConfig, CMAES),
    "random": (RandomSearchConfig, RandomSearch),
    "nevergrad": (NevergradConfig, Nevergrad),
    "frank_wolfe": (FrankWolfeConfig, FrankWolfe),
    "evo_merging": (EvoMergingConfig, EvoMerging),
    "pymoo": (PymooConfig, Pymoo),
}


def build_strategy(cfg, space: SpaceInfo, seed: int, parallelism: int = 1, max_evals: int | None = None,
                   example_counts: tuple[int, ...] | None = None, objectives: tuple[str, ...] = ()) -> Strategy:
    """The strategy `cfg.name` names; `parallelism` (candidates the engine keeps outstanding), `max_evals`,
    the fitness's `example_counts` and `objectives` are the run's context (RunContext) every strategy is given."""
    run = RunContext(parallelism=parallelism, max_evals=max_evals, example_counts=example_counts,
                     objectives=tuple(objectives))
    return STRATEGIES[cfg.name][1].build(cfg, space, seed, run)


__all__ = ["Candidate", "Result", "RunContext", "SpaceInfo", "Strategy", "STRATEGIES", "build_strategy"]
