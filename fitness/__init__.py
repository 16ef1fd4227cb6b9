"""Evaluators. Add one: a module plus a line in FITNESSES."""
from .base import BatchEvaluation, Fitness, ModelFitness
from .digits import DigitsFitness, DigitsFitnessConfig
from .lm_tasks import LMTasksFitness, LMTasksFitnessConfig

FITNESSES = {
    "digits": (DigitsFitnessConfig, DigitsFitness),
    "lm_tasks": (LMTasksFitnessConfig, LMTasksFitness),
}


def build_fitness(cfg) -> Fitness:
    return FITNESSES[cfg.name][1](cfg)


__all__ = ["BatchEvaluation", "Fitness", "ModelFitness", "FITNESSES", "build_fitness"]
