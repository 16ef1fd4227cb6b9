"""The fitness worker: a Ray actor holding the data and a resident model, scoring a batch per call."""
from __future__ import annotations

import os
import resource
import time

import numpy as np


class FitnessWorker:
    """Wrapped with ray.remote by the engine; also usable in-process (tests, benchmarks)."""

    def __init__(self, index: int, space_cfg, fitness_cfg, seed: int, threads: int):
        import torch

        from fitness import ModelFitness, build_fitness

        from .spaces import build_space

        torch.set_num_threads(threads)
        self.index = index
        self.space = build_space(space_cfg, seed)
        self.fitness = build_fitness(fitness_cfg)
        self.model_based = isinstance(self.fitness, ModelFitness)
        self.device = "cpu"
        if self.model_based:  # the resident model: loaded once, merged into in place per candidate
            self.runtime = self.space.open_runtime()
            self.device = str(self.runtime.device)

    def ready(self) -> dict:
        return {"index": self.index, "pid": os.getpid(), "device": self.device}

    def evaluate(self, batch: np.ndarray):
        from fitness import BatchEvaluation

        start = time.perf_counter()
        if not self.model_based:
            ev = self.fitness.evaluate(batch)
        else:
            fits, scores, metrics = [], [], {}
            for x in batch:
                model = self.runtime.materialize(self.space.decode(x))
                f, s, m = self.fitness.evaluate_model(model, self.runtime.tokenizer)
                fits.append(f)
                scores.append(s)
                for k, v in m.items():
                    metrics.setdefault(k, []).append(v)
            ev = BatchEvaluation(np.asarray(fits, np.float64), np.stack(scores),
                                 {k: np.asarray(v) for k, v in metrics.items()})
        return ev, time.perf_counter() - start, self.index

    def holdout(self, x: np.ndarray) -> dict[str, float]:
        if not self.model_based:
            return self.fitness.holdout(x)
        model = self.runtime.materialize(self.space.decode(x))
        return self.fitness.holdout_model(model, self.runtime.tokenizer)

    def save(self, x: np.ndarray, directory: str, info: dict) -> None:
        from pathlib import Path

        self.space.save(x, Path(directory), info)

    def peak_rss_mb(self) -> float:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
