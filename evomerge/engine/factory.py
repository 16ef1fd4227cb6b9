"""The start-up order of a search, new or resumed, in one place: the checks that refuse a config before
anything starts, then the space's preparation in a thread while the workers' runtime starts, the
workers, the strategy, the resumed state, and the run directory's first files."""
from __future__ import annotations

import sys
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from typing import Callable

from evomerge.fitness import FITNESSES
from evomerge.populations import STRATEGIES, SpaceInfo, build_strategy

from ..config import RunConfig, to_yaml
from ..errors import UserError
from ..rundir import RunDir
from ..spaces import build_space
from ..spaces.base import SearchSpace
from .loop import Engine, window
from .pool import WorkerPool
from .ray_pool import RayPool


def preflight(cfg: RunConfig) -> SearchSpace:
    """The checks before anything starts; returns the search space. The fitness's own checks come first
    (its data, its API key and server: cheaper than the space, which may load torch and models), then
    the strategy's for the space's dimension, then what the strategy needs the workers to compute."""
    fitness = FITNESSES[cfg.fitness.name][1]
    fitness.check(cfg.fitness)
    space = build_space(cfg.space, cfg.seed)
    strategy = STRATEGIES[cfg.strategy.name][1]
    strategy.preflight(cfg.strategy, space.dim)
    strategy.check_objectives(cfg.strategy, tuple(fitness.objectives(cfg.fitness)))
    check_scoring(cfg)
    if "weight_gradient" in strategy.extra_metrics(cfg.strategy):
        space.check_weight_gradient()
        if not fitness.differentiable:
            raise UserError(f"fitness.name: {cfg.fitness.name} has no differentiable loss; use a black-box "
                            "oracle (strategy.oracle: black_box) or a differentiable fitness (lm_tasks)")
    return space


def check_scoring(cfg: RunConfig) -> None:
    """`scoring` (subsets, racing) needs a fitness that scores subsets, and a strategy that takes them."""
    sc = cfg.scoring
    if not sc.active:
        return
    field = "scoring.subsample" if sc.subsample is not None else "scoring.race"
    counts = FITNESSES[cfg.fitness.name][1].example_counts(cfg.fitness)
    if counts is None:
        raise UserError(f"{field}: fitness {cfg.fitness.name} cannot score a subset of its examples; "
                        "remove scoring.subsample and scoring.race")
    strategy = STRATEGIES[cfg.strategy.name][1]
    if sc.subsample is not None and sc.resample and strategy.same_examples:
        raise UserError(f"scoring.resample: {cfg.strategy.name} compares per-example scores across its archive, "
                        "so every candidate needs the same examples: set scoring.resample: false (one subset "
                        "for the run) or remove scoring.subsample")
    if sc.race is not None and not strategy.races:
        racing = sorted(n for n, (_, s) in STRATEGIES.items() if s.races)
        raise UserError(f"scoring.race: strategy {cfg.strategy.name} does not rank cohorts (racing applies to "
                        f"{', '.join(racing) or 'no strategy yet'}); remove scoring.race")
    if sc.race is not None and strategy.same_examples:
        raise UserError(f"scoring.race: {cfg.strategy.name} needs every candidate's scores on the same examples; "
                        "remove scoring.race")


class Startup:
    """`with Startup(cfg, run, ...) as engine:` an Engine ready to run, its workers started; on leaving,
    the workers' runtime (e.g. the private Ray instance) is shut down.

    The order: preflight; the space's prepare() and seeds() in a thread while the pool's runtime starts;
    once prepared (the workers map the task vectors rather than recompute them), the fitness's shared
    resource (from the checkpoint when resuming) and the workers; the strategy; a resumed run's state
    (checkpoint + journal replay); the workers ready; the run directory started (config.yaml).
    `pool` makes the WorkerPool from the config (RayPool; tests: an InProcessPool).
    """

    def __init__(self, cfg: RunConfig, run: RunDir, *, resume: bool = False, config_changed: bool = False,
                 progress: bool = True, pool: Callable[[RunConfig], WorkerPool] = RayPool):
        self.cfg = cfg
        self.run = run
        self.resume = resume
        self.config_changed = config_changed  # resumed with --set: config.yaml is rewritten
        self.progress = progress
        self.make_pool = pool
        self.stack = ExitStack()

    def __enter__(self) -> Engine:
        try:
            return self._start()
        except BaseException:
            self.stack.close()
            raise

    def __exit__(self, *exc) -> None:
        self.stack.close()

    def _start(self) -> Engine:
        cfg, run = self.cfg, self.run
        space = preflight(cfg)
        threads = self.stack.enter_context(ThreadPoolExecutor(1))
        prepared = threads.submit(space.prepare)
        seeds = threads.submit(space.seeds)
        pool = self.make_pool(cfg)
        self.stack.enter_context(pool.session())
        prepared.result()
        state = run.checkpoint["engine"].get("fitness_shared") if self.resume else None
        shared = FITNESSES[cfg.fitness.name][1].open_shared(cfg.fitness, state)
        pool.launch(shared)
        info = SpaceInfo(dim=space.dim, seeds=tuple(seeds.result()), lower=space.lower, upper=space.upper,
                         random_seeds=space.random_seeds,
                         layout=tuple(space.layout) if space.layout is not None else None, gram=space.gram)
        counts = FITNESSES[cfg.fitness.name][1].example_counts(cfg.fitness)
        strategy = build_strategy(cfg.strategy, info, cfg.seed, parallelism=window(cfg.engine),
                                  max_evals=cfg.budget.max_evals,
                                  example_counts=None if counts is None else tuple(counts),
                                  objectives=tuple(FITNESSES[cfg.fitness.name][1].objectives(cfg.fitness)))
        engine = Engine(cfg, space, strategy, pool, run, shared=shared, progress=self.progress,
                        example_counts=counts)  # the task files read once here, not again by the engine
        if self.resume:
            replayed = engine.restore()
            print(f"resuming {run.path}: {engine.ledger.counts['told']} evaluations done "
                  f"({replayed} journal entries replayed)", file=sys.stderr)
            if self.config_changed:
                run.write_config(to_yaml(cfg))
        pool.wait_ready()
        if not run.started:
            run.start(to_yaml(cfg))
        return engine


def search(cfg: RunConfig, run: RunDir, *, resume: bool = False, config_changed: bool = False,
           progress: bool = True, pool: Callable[[RunConfig], WorkerPool] = RayPool,
           t_start: float | None = None, on_start: Callable[[Engine], object] | None = None) -> dict:
    """A search (or one more session of a resumed one) to its end; writes and returns summary.json.
    `on_start(engine)`, if given, is a context manager held while the engine runs (the CLI's signal
    handlers); `t_start` is when the command started (summary's total_seconds)."""
    t_start = time.perf_counter() if t_start is None else t_start
    with Startup(cfg, run, resume=resume, config_changed=config_changed, progress=progress, pool=pool) as engine:
        with ExitStack() as running:
            if on_start is not None:
                running.enter_context(on_start(engine))
            summary = engine.run()
        summary["total_seconds"] = round(time.perf_counter() - t_start, 3)
        run.write_summary(summary)
    return summary
