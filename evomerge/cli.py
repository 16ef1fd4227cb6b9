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
    p.add_argument("--config", required=True, metavar="YAML", help="run config (see configs/)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field, e.g. --set budget.max_evals=500 (repeatable)")
    p.add_argument("--out", metavar="DIR", help="run directory (default runs/<config>-<time>); must be new")
    p.add_argument("--no-progress", action="store_true", help="no progress bar or progress lines")
    return p


def default_out(config: str) -> Path:
    stem = Path(config).stem
    base = Path("runs") / f"{stem}-{datetime.now().strftime('%Y%m%d-%H%M%S')}"
    out, k = base, 1
    while out.exists():
        k += 1
        out = base.with_name(f"{base.name}-{k}")
    return out


def cmd_run(args: argparse.Namespace) -> int:
    t_start = time.perf_counter()
    from concurrent.futures import ThreadPoolExecutor

    from populations import STRATEGIES, SpaceInfo, build_strategy

    from .config import load_config, to_yaml
    from .engine import Engine, RayCluster
    from .rundir import RunDir, check_new
    from .space import build_space

    cfg = load_config(args.config, args.set)
    out = Path(args.out) if args.out else default_out(args.config)
    check_new(out)
    space = build_space(cfg.space, cfg.seed)
    STRATEGIES[cfg.strategy.name][1].preflight(cfg.strategy, space.dim)
    engine = Engine(cfg, space, progress=not args.no_progress)
    # Ray and the workers start while the seeds (e.g. trained experts) are made in a thread.
    with ThreadPoolExecutor(1) as pool:
        seeds = pool.submit(space.seeds)
        with RayCluster(cfg.engine):
            engine.launch_workers()
            info = SpaceInfo(dim=space.dim, seeds=tuple(seeds.result()), lower=space.lower,
                             upper=space.upper, random_seeds=space.random_seeds)
            engine.strategy = build_strategy(cfg.strategy, info, cfg.seed)
            engine.wait_workers()
            run = RunDir.create(out, to_yaml(cfg))
            try:
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
    if best:
        print(f"best fitness {best['fitness']:.4f} (eval {best['eval_id']}); held-out: "
              + json.dumps(best["holdout"]))
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return cmd_run(args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
