"""The fitness worker: a Ray actor holding the data and a resident model, scoring a batch per call."""
from __future__ import annotations

import os
import resource
import sys
import time

import numpy as np

from ..errors import UserError


class FitnessWorker:
    """Wrapped with ray.remote by the engine; also usable in-process (tests, benchmarks)."""

    def __init__(self, index: int, space_cfg, fitness_cfg, seed: int, threads: int, extra_metrics: tuple = (),
                 gpu_share: float = 1.0, *, shared=None):
        """`shared`: what the fitness class's open_shared opened for the run (e.g. the API budget's
        actor), handed to the fitness."""
        self.index = index
        self.start_error: Exception | None = None
        try:
            self._start(space_cfg, fitness_cfg, seed, threads, extra_metrics, gpu_share, shared)
        except UserError as e:  # raised again by ready(): Ray keeps a task's exception (a RayTaskError
            self.start_error = e  # with .cause), but of a failed actor constructor only a message string

    def _start(self, space_cfg, fitness_cfg, seed: int, threads: int, extra_metrics: tuple, gpu_share: float,
               shared) -> None:
        from evomerge.fitness import build_fitness

        from ..spaces import build_space

        # torch is imported only by what needs it (seconds saved when a worker starts or is replaced)
        os.environ.setdefault("OMP_NUM_THREADS", str(threads))
        self.extra_metrics = tuple(extra_metrics)  # see Strategy.extra_metrics
        self.space = build_space(space_cfg, seed)
        self.space.gpu_share = gpu_share  # engine.gpus_per_worker < 1: the worker's memory plan takes its share
        self.fitness = build_fitness(fitness_cfg, shared)
        if "torch" in sys.modules:  # imported by the space or fitness: before any heavy tensor work
            sys.modules["torch"].set_num_threads(threads)
        self.device = "cpu"
        if self.fitness.input == "model":  # the resident model: loaded once, merged into in place per candidate
            self.runtime = self.space.open_runtime()
            self.device = str(self.runtime.device)

    def ready(self) -> dict:
        if self.start_error is not None:
            raise self.start_error
        return {"index": self.index, "pid": os.getpid(), "device": self.device}

    def evaluate(self, batch: np.ndarray, examples: list | None = None) -> dict:
        """Score a batch. An exception is caught per candidate: the others still get their scores.
        `examples`: per candidate, the search examples to score it on (None: all; see fitness/base.py);
        None: all examples for every candidate. Per-example scores are then those of its examples
        ("scores" is a list of 1-D arrays instead of one 2-D array when their lengths differ).

        Returns {"fitness": (B,), "scores": (B, n) or None, "metrics": name -> (B,),
        "errors": [None or 'Type: message'] * B, "timing": [None or dict] * B, "seconds", "worker"}.

        timing, per candidate scored (None where it failed): "score_s", the seconds the fitness took
        (a batch scored at once: its seconds / B; weight_gradient extra metrics count here), and for a model
        fitness "merge_s", the seconds the runtime took to materialize the candidate (its merge into
        the resident model), and "transfer_s" when the runtime streamed merge inputs to its device:
        the seconds of those host-to-device copies, which overlap the merge (part of merge_s, not
        added to it).
        """
        start = time.perf_counter()
        ex = examples if examples is not None else [None] * len(batch)
        if self.fitness.input == "vector":  # a batch at once per example set; one at a time to find failures
            rows: list = [None] * len(batch)
            sets: dict = {}
            for j, e in enumerate(ex):
                sets.setdefault(None if e is None else tuple(int(i) for i in e), []).append(j)
            for idx in sets.values():
                t0 = time.perf_counter()
                try:
                    ev = (self.fitness.evaluate(batch[idx]) if ex[idx[0]] is None
                          else self.fitness.evaluate(batch[idx], ex[idx[0]]))
                    per = {"score_s": (time.perf_counter() - t0) / len(idx)}
                    for r, j in enumerate(idx):
                        rows[j] = (float(ev.fitness[r]), None if ev.scores is None else ev.scores[r],
                                   {k: float(v[r]) for k, v in ev.metrics.items()}, None, dict(per))
                except Exception as e:  # noqa: BLE001 - find the candidates that raise, score the rest
                    for j in idx:
                        rows[j] = ((float("nan"), None, {}, _describe(e), None) if len(idx) == 1
                                   else self._one(batch[j], ex[j]))
            out = self._pack(rows)
        else:
            out = self._pack([self._one(x, e) for x, e in zip(batch, ex)])
        out["seconds"] = time.perf_counter() - start
        out["worker"] = self.index
        return out

    def _one(self, x: np.ndarray, examples: np.ndarray | None = None) -> tuple:
        """(fitness, scores, metrics, error, timing) of one candidate; see evaluate."""
        clock = time.perf_counter
        try:
            if self.fitness.input == "recipe":  # scored remotely, e.g. through an API
                recipe = self.space.decode(x)
                t0 = clock()
                f, s, m = (self.fitness.evaluate_recipe(recipe) if examples is None
                           else self.fitness.evaluate_recipe(recipe, examples))
                return float(f), s, dict(m), None, {"score_s": clock() - t0}
            if self.fitness.input == "model":
                recipe = self.space.decode(x)
                t0 = clock()
                model = self.runtime.materialize(recipe)  # the runtime synchronizes its device before returning
                t1 = clock()
                timing = {"merge_s": t1 - t0}
                transfer = self.runtime.last_transfer_s  # overlaps the merge: within merge_s
                if transfer is not None:
                    timing["transfer_s"] = float(transfer)
                f, s, m = (self.fitness.evaluate_model(model, self.runtime.tokenizer) if examples is None
                           else self.fitness.evaluate_model(model, self.runtime.tokenizer, examples))
                m = dict(m)
                if "weight_gradient" in self.extra_metrics:
                    tok = self.runtime.tokenizer
                    loss, grads = self.runtime.weight_gradient(recipe, lambda mdl: self.fitness.loss_model(mdl, tok),
                                                               materialized=True)
                    m["loss"] = loss
                    for g, per in grads.items():
                        for label, v in zip(recipe["experts"], per):
                            m[f"dloss/{g}/{label}"] = v
                timing["score_s"] = clock() - t1
                return float(f), s, m, None, timing
            t0 = clock()
            ev = self.fitness.evaluate(x[None]) if examples is None else self.fitness.evaluate(x[None], examples)
            return (float(ev.fitness[0]), None if ev.scores is None else ev.scores[0],
                    {k: float(v[0]) for k, v in ev.metrics.items()}, None, {"score_s": clock() - t0})
        except Exception as e:  # noqa: BLE001 - reported per candidate, the run goes on
            return float("nan"), None, {}, _describe(e), None

    @staticmethod
    def _pack(rows: list[tuple]) -> dict:
        """rows: (fitness, scores, metrics, error, timing) per candidate."""
        widths = {np.asarray(r[1]).size for r in rows if r[1] is not None}
        scores = None
        if len(widths) == 1:
            scores = np.zeros((len(rows), widths.pop()))
            for j, r in enumerate(rows):
                if r[1] is not None:
                    scores[j] = np.asarray(r[1], np.float64).reshape(-1)
        elif widths:  # candidates scored on example sets of different sizes
            scores = [None if r[1] is None else np.asarray(r[1], np.float64).reshape(-1) for r in rows]
        names = {k for r in rows for k in r[2]}
        return {"fitness": np.array([r[0] for r in rows], np.float64), "scores": scores,
                "metrics": {k: np.array([r[2].get(k, np.nan) for r in rows]) for k in sorted(names)},
                "errors": [r[3] for r in rows], "timing": [r[4] for r in rows]}

    def holdout(self, x: np.ndarray) -> dict[str, float]:
        if self.fitness.input == "recipe":
            return self.fitness.holdout_recipe(self.space.decode(x))
        if self.fitness.input == "vector":
            return self.fitness.holdout(x)
        model = self.runtime.materialize(self.space.decode(x))
        return self.fitness.holdout_model(model, self.runtime.tokenizer)

    def save(self, x: np.ndarray, directory: str, info: dict) -> None:
        from pathlib import Path

        self.space.save(x, Path(directory), info)

    def peak_rss_mb(self) -> float:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _describe(e: Exception) -> str:
    msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return f"{type(e).__name__}: {msg}"[:500]
