"""The fitness worker: a Ray actor holding the data and a resident model, scoring a batch per call."""
from __future__ import annotations

import os
import resource
import time

import numpy as np


class FitnessWorker:
    """Wrapped with ray.remote by the engine; also usable in-process (tests, benchmarks)."""

    def __init__(self, index: int, fitness_cfg, threads: int):
        import torch

        from fitness import build_fitness

        torch.set_num_threads(threads)
        self.index = index
        self.fitness = build_fitness(fitness_cfg)

    def ready(self) -> dict:
        return {"index": self.index, "pid": os.getpid()}

    def evaluate(self, batch: np.ndarray):
        start = time.perf_counter()
        ev = self.fitness.evaluate(batch)
        return ev, time.perf_counter() - start, self.index

    def holdout(self, x: np.ndarray) -> dict[str, float]:
        return self.fitness.holdout(x)

    def peak_rss_mb(self) -> float:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
