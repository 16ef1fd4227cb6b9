"""Command line: `python run.py --config configs/X.yaml [--set a.b=v ...] [--out runs/NAME]`."""
from __future__ import annotations

import argparse
import json
import sys
import time
from datetime import datetime
from pathlib import Path

from .errors import UserError


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="evomerge",
        description="Search for model merges: evolve merge coefficients with a strategy while Ray "
                    "workers score each candidate.",
        epilog="example: python run.py --config configs/quickstart.yaml --set strategy.alpha=0.5")
    p.add_argument("--config", metavar="YAML", help="run config (see configs/)")
    p.add_argument("--resume", metavar="RUN_DIR",
                   help="continue an interrupted or finished run (with --set budget.* to extend its budget)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field, e.g. --set budget.max_evals=500 (repeatable)")
    p.add_argument("--out", metavar="DIR", help="run directory (default runs/<config>-<time>); must be new")
    p.add_argument("--no-progress", action="store_true", help="no progress bar or progress lines")
    p.add_argument("--dry-run", action="store_true",
                   help="print the search dimension, the parameter layout and the recipe at the centre; run nothing")
    return p


def _export_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="evomerge export", description="Export an evaluation of a run: the best "
                                "by default, or --eval-id N, as a Hugging Face model directory and/or a mergekit YAML.")
    p.add_argument("run_dir", metavar="RUN_DIR")
    p.add_argument("--eval-id", type=int, metavar="N", help="evaluation id in RUN_DIR/evals.jsonl (default: the best)")
    p.add_argument("--to", metavar="DIR", help="write a model directory loadable by from_pretrained")
    p.add_argument("--mergekit", metavar="FILE", help="write a mergekit YAML that reproduces the merge")
    p.add_argument("--prefer", metavar="TASK=W,...", help="pick from the Pareto front over the tasks the "
                   "evaluation with the largest weighted sum, e.g. --prefer upper=0.7,count=0.3")
    return p


def cmd_export(argv: list[str]) -> int:
    from .export import export

    args = _export_parser().parse_args(argv)
    if not args.to and not args.mergekit:
        raise UserError("export: give --to DIR and/or --mergekit FILE")
    print(export(args.run_dir, args.eval_id, args.to, args.mergekit, args.prefer))
    return 0


def cmd_dry_run(args: argparse.Namespace) -> int:
    from .config import load_config
    from .spaces import build_space

    if not args.config:
        raise UserError("--dry-run needs --config YAML")
    cfg = load_config(args.config, args.set)
    space = build_space(cfg.space, cfg.seed)
    info = space.describe()
    print(f"dimension: {space.dim}")
    for key, value in info.items():
        if key not in ("dim", "layout"):
            print(f"{key}: {json.dumps(value)}")
    for row in info.get("layout", []):
        print(f"  {row}")
    if space.lower is not None:
        centre = (space.lower + space.upper) / 2
        print("recipe at the centre:")
        print(json.dumps(space.recipe(centre), indent=2))
    return 0


def default_out(config: str) -> Path:
    stem = Path(config).stem
    base = Path("runs") / f"{stem}-{datetime.now().strftime('%Y%m%d-%H%M%S')}"
    out, k = base, 1
    while out.exists():
        k += 1
        out = base.with_name(f"{base.name}-{k}")
    return out


RESUMABLE_SETS = ("budget.", "engine.address=", "progress_every_s=", "fitness.max_requests=",
                  "fitness.max_tokens=")


def cmd_run(args: argparse.Namespace) -> int:
    t_start = time.perf_counter()
    from concurrent.futures import ThreadPoolExecutor

    from populations import STRATEGIES, SpaceInfo, build_strategy

    from .config import apply_sets, load_config, read_yaml, to_yaml, validate
    from .engine import Engine, RayCluster
    from .rundir import RunDir, check_new
    from .spaces import build_space

    if args.resume:
        if args.config or args.out:
            raise UserError("--resume: the run directory holds its config; drop --config and --out")
        for item in args.set:
            if not item.startswith(RESUMABLE_SETS):
                raise UserError(f"--set {item}: a resumed run may change only budget.*, engine.address, "
                                "progress_every_s and an API fitness's max_requests / max_tokens")
        out = Path(args.resume)
        run = RunDir.open(out)
        cfg = validate(apply_sets(read_yaml(out / "config.yaml"), args.set))
    else:
        if not args.config:
            raise UserError("give --config YAML (a new run) or --resume RUN_DIR")
        cfg = load_config(args.config, args.set)
        out = Path(args.out) if args.out else default_out(args.config)
        check_new(out)
        run = None
    space = build_space(cfg.space, cfg.seed)
    STRATEGIES[cfg.strategy.name][1].preflight(cfg.strategy, space.dim)
    _preflight(cfg, space)
    engine = Engine(cfg, space, progress=not args.no_progress)
    # Ray starts while the seeds (e.g. trained experts) and the task vectors are made in a thread;
    # the workers start once the task vectors are on disk, to map rather than recompute them.
    with ThreadPoolExecutor(1) as pool:
        prepared = pool.submit(space.prepare)
        seeds = pool.submit(space.seeds)
        with RayCluster(cfg.engine):
            prepared.result()
            engine.launch_workers(Engine.saved_shared_state(run) if run is not None else None)
            layout = getattr(space, "layout", None)
            info = SpaceInfo(dim=space.dim, seeds=tuple(seeds.result()), lower=space.lower,
                             upper=space.upper, random_seeds=space.random_seeds,
                             layout=tuple(layout) if layout is not None else None,
                             gram=getattr(space, "gram", None))
            engine.strategy = build_strategy(cfg.strategy, info, cfg.seed, parallelism=engine.window,
                                             max_evals=cfg.budget.max_evals)
            if run is not None:
                replayed = engine.restore(run)
                print(f"resuming {out}: {engine.counts['told']} evaluations done "
                      f"({replayed} journal entries replayed)", file=sys.stderr)
                if args.set:
                    run.write_config(to_yaml(cfg))
            engine.wait_workers()
            if run is None:
                run = RunDir.create(out, to_yaml(cfg))
            try:
                with _stop_on_signals(engine):
                    summary = engine.run(run)
                summary["total_seconds"] = round(time.perf_counter() - t_start, 3)
                run.write_summary(summary)
            finally:
                run.close()
    best = summary.get("best", {})
    print(f"run directory: {out}")
    print(f"stopped by {summary['stop_reason']} after {summary['evaluations']} evaluations in "
          f"{summary['search_seconds']:.1f} s of search ({summary['evals_per_second']:.0f} evals/s, "
          f"start-up {summary['startup_seconds']:.1f} s)")
    if summary["failed"]:
        print(f"{summary['failed']} evaluations failed; last: {summary.get('last_failure')}")
    if best:
        print(f"best fitness {best['fitness']:.4f} (eval {best['eval_id']}); held-out: "
              + json.dumps(best["holdout"]))
    if summary["stop_reason"] == "fitness_stop":
        print(f"stopped by the fitness: {summary.get('last_failure')}; continue with: python run.py --resume {out}",
              file=sys.stderr)
    if summary["stop_reason"] == "interrupted":
        print(f"interrupted; continue with: python run.py --resume {out}", file=sys.stderr)
        return 130
    if summary["stop_reason"] == "too_many_failures":
        print(f"error: stopped: {summary['failed']} of {summary['evaluations']} evaluations failed (more than "
              f"engine.max_failure_fraction={cfg.engine.max_failure_fraction}); last: {summary.get('last_failure')}; "
              f"fix the fitness, then: python run.py --resume {out}", file=sys.stderr)
        return 1
    return 0


def _preflight(cfg, space) -> None:
    """Refuse before anything starts what cannot work: the fitness's own checks (e.g. its API key) and
    what the strategy needs the workers to compute."""
    from fitness import FITNESSES
    from populations import STRATEGIES

    check = getattr(FITNESSES[cfg.fitness.name][1], "check", None)
    if check is not None:
        check(cfg.fitness)
    if "weight_gradient" in STRATEGIES[cfg.strategy.name][1].worker_extras(cfg.strategy):
        if not hasattr(space, "check_weight_gradient"):
            raise UserError(f"space.name: {cfg.space.name}: gradient oracles need a merge space (hf_merge)")
        space.check_weight_gradient()
        if not hasattr(FITNESSES[cfg.fitness.name][1], "loss_model"):
            raise UserError(f"fitness.name: {cfg.fitness.name} has no differentiable loss; use a black-box "
                            "oracle (strategy.oracle: black_box) or a differentiable fitness (lm_tasks)")


class _stop_on_signals:
    """Ctrl-C or SIGTERM: stop dispatching, checkpoint and shut down cleanly; a second one aborts."""

    def __init__(self, engine):
        self.engine = engine

    def _handle(self, signum, frame):
        if self.engine.stop_requested:
            raise KeyboardInterrupt
        self.engine.stop_requested = "interrupted"
        print("\nstopping: writing a checkpoint (press Ctrl-C again to abort)", file=sys.stderr)

    def __enter__(self):
        import signal

        self.old = {s: signal.signal(s, self._handle) for s in (signal.SIGINT, signal.SIGTERM)}
        return self

    def __exit__(self, *exc):
        import signal

        for s, h in self.old.items():
            signal.signal(s, h)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        if argv[:1] == ["export"]:
            return cmd_export(argv[1:])
        if argv[:1] == ["serve"]:
            from .serve import serve_main

            return serve_main(argv[1:])
        if argv[:1] == ["zoo"]:
            from .tinylm import zoo_main

            return zoo_main(argv[1:])
        args = _parser().parse_args(argv)
        return cmd_dry_run(args) if args.dry_run else cmd_run(args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
