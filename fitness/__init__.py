"""Evaluators. Add one: a module plus a line in FITNESSES."""
from .base import BatchEvaluation, Fitness, ModelFitness
from .digits import DigitsFitness, DigitsFitnessConfig

FITNESSES = {
    "digits": (DigitsFitnessConfig, DigitsFitness),
}


def build_fitness(cfg) -> Fitness:
    return FITNESSES[cfg.name][1](cfg)


__all__ = ["BatchEvaluation", "Fitness", "ModelFitness", "FITNESSES", "build_fitness"]
