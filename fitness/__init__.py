"""Evaluators. Add one: a module plus a line in FITNESSES."""
from .base import BatchEvaluation, Fitness, ModelFitness
from .digits import DigitsFitness, DigitsFitnessConfig
from .lm_tasks import LMTasksFitness, LMTasksFitnessConfig
from .synthetic import SyntheticFitness, SyntheticFitnessConfig

FITNESSES = {
    "digits": (DigitsFitnessConfig, DigitsFitness),
    "lm_tasks": (LMTasksFitnessConfig, LMTasksFitness),
    "synthetic": (SyntheticFitnessConfig, SyntheticFitness),
}


def build_fitness(cfg) -> Fitness:
    return FITNESSES[cfg.name][1](cfg)


__all__ = ["BatchEvaluation", "Fitness", "ModelFitness", "FITNESSES", "build_fitness"]
