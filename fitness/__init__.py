"""Evaluators. Add one: a module plus a line in FITNESSES."""
from .api import APIFitness, APIFitnessConfig
from .base import BatchEvaluation, Fitness, ModelFitness, RecipeFitness, StopRun
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


def build_fitness(cfg) -> Fitness:
    return FITNESSES[cfg.name][1](cfg)


__all__ = ["BatchEvaluation", "Fitness", "ModelFitness", "RecipeFitness", "StopRun", "FITNESSES", "build_fitness"]
