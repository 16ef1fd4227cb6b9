"""Evaluators. Add one: a module plus a line in FITNESSES."""
from .api import APIFitness, APIFitnessConfig
from .base import BatchEvaluation, Fitness, SharedResource, StopRun
from .digits import DigitsFitness, DigitsFitnessConfig
from .lm_eval import LMEvalFitness, LMEvalFitnessConfig
from .lm_tasks import LMTasksFitness, LMTasksFitnessConfig
from .synthetic import SyntheticFitness, SyntheticFitnessConfig

FITNESSES = {
    "api": (APIFitnessConfig, APIFitness),
    "digits": (DigitsFitnessConfig, DigitsFitness),
    "lm_eval": (LMEvalFitnessConfig, LMEvalFitness),
    "lm_tasks": (LMTasksFitnessConfig, LMTasksFitness),
    "synthetic": (SyntheticFitnessConfig, SyntheticFitness),
}


def build_fitness(cfg, shared: SharedResource | None = None) -> Fitness:
    """The fitness `cfg.name` names, given what its class's `open_shared` opened for the run."""
    return FITNESSES[cfg.name][1](cfg, shared)


__all__ = ["BatchEvaluation", "Fitness", "SharedResource", "StopRun", "FITNESSES", "build_fitness"]
