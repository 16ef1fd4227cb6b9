"""Command line: `python run.py --config configs/X.yaml [--set a.b=v ...] [--out runs/NAME]`."""
from __future__ import annotations

import argparse
import json
import sys
import time
from datetime import datetime
from pathlib import Path

from .command import prog
from .errors import UserError
from .progress import rate_text


COMMANDS = (
    ("run", "search (the default command: `run` may be left out)"),
    ("export", "write an evaluation as a Hugging Face model directory and/or a mergekit YAML"),
    ("report", "plots and a Markdown summary of one run, or several runs overlaid"),
    ("serve", "serve a base model and its experts (and merges of them) over an OpenAI-compatible API"),
    ("zoo", "build a small model family locally (the tiny-LM experts of the demos and tests)"),
)


RESUMABLE_SETS = ("budget.", "engine.address=", "engine.worker_start_timeout_s=", "progress_every_s=",
                  "fitness.max_requests=", "fitness.max_tokens=")
RESUMABLE_TEXT = ("budget.*, engine.address, engine.worker_start_timeout_s, progress_every_s and an API fitness's "
                  "max_requests / max_tokens")


def _parser(command: str | None = None) -> argparse.ArgumentParser:
    commands = "\n".join(f"  {name:<8} {text}" for name, text in COMMANDS)
    p = argparse.ArgumentParser(
        prog=prog(command),
        formatter_class=argparse.RawDescriptionHelpFormatter,
        usage=f"{prog(command)} --config YAML [--set KEY=VALUE ...] [--out DIR] [--no-progress] "
              "[--dry-run [--verbose]]\n"
              f"       {prog(command)} --resume RUN_DIR [--set budget.KEY=VALUE ...]"
              + ("" if command else f"\n       {prog()} {{export,report,serve,zoo}} ... (see {prog()} COMMAND --help)"),
        description="Search for model merges: a strategy proposes merge coefficients, Ray workers merge and score "
                    "each candidate,\nand every evaluation lands in a run directory (evals.jsonl, checkpoint.pkl, "
                    "summary.json, best/).",
        epilog=("" if command else f"commands:\n{commands}\n\n")
        + "exit codes: 0 finished: budget spent, strategy done, or stopped by the fitness (e.g. its API budget;\n"
          "  resumable), 1 stopped by failing evaluations or with no worker left (resumable),\n"
          "  2 a mistake in the config or the arguments (one line naming it; no run directory is created),\n"
          "  130 interrupted (Ctrl-C / SIGTERM; resumable)\n\n"
          "examples:\n"
          f"  {prog()} --config configs/quickstart.yaml\n"
          f"  {prog()} --config configs/quickstart.yaml --set strategy.alpha=0.5 --set engine.workers=4 --out runs/a\n"
          f"  {prog()} --config configs/tinylm_ties_cmaes.yaml --dry-run\n"
          f"  {prog()} --resume runs/a --set budget.max_evals=20000\n"
          f"  {prog()} report runs/a")
    p.add_argument("--config", metavar="YAML",
                   help="run config (see configs/ and the config reference in README.md)")
    p.add_argument("--resume", metavar="RUN_DIR",
                   help="continue an interrupted or finished run from its checkpoint and journal; only "
                        f"{RESUMABLE_TEXT} may be changed with --set (e.g. --set budget.max_evals=20000 to extend it)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field, the value read as YAML, e.g. --set budget.max_evals=500 or "
                        "--set 'space.params.weight={low: 0, high: 2}' (repeatable)")
    p.add_argument("--out", metavar="DIR", help="run directory (default runs/<config name>-<date>-<time>); must be "
                                                "new or empty")
    p.add_argument("--no-progress", action="store_true",
                   help="no progress bar or progress lines (a line every progress_every_s seconds is printed when "
                        "stderr is not a terminal)")
    p.add_argument("--dry-run", action="store_true",
                   help="with --config: print a summary of the search: its dimension, the parameter layout and the "
                        "recipe at the centre of the space (--verbose: all of it) and, for an hf_merge space, "
                        "each worker's memory plan, then exit; starts no "
                        "workers and writes nothing")
    p.add_argument("--verbose", action="store_true", help="with --dry-run: every coordinate of the layout and "
                   "the whole recipe (default: a compact summary)")
    p.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    return p


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("evomerge")
    except PackageNotFoundError:
        return "unknown (not installed)"


def _export_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog("export"), description="Export an evaluation of a run: the best by default, or --eval-id N, or "
        "the Pareto-front member preferred by --prefer, as a Hugging Face model directory (from_pretrained, with "
        "the tokenizer) and/or a mergekit YAML that reproduces the merge with mergekit-yaml.",
        epilog=f"examples:\n  {prog('export')} runs/a --to merged/\n"
               f"  {prog('export')} runs/a --eval-id 17 --mergekit merge.yaml\n"
               f"  {prog('export')} runs/a --prefer upper=0.7,count=0.3 --to merged/",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir", metavar="RUN_DIR", help="a run directory (with config.yaml and evals.jsonl)")
    p.add_argument("--eval-id", type=int, metavar="N", help="evaluation id in RUN_DIR/evals.jsonl (default: the best)")
    p.add_argument("--to", metavar="DIR", help="write a model directory loadable by from_pretrained (must be new)")
    p.add_argument("--mergekit", metavar="FILE", help="write a mergekit YAML that reproduces the merge "
                   "(merge spaces: hf_merge, hf_mixture)")
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


SHOWN = 4  # --dry-run: items of a long list shown without --verbose


def _short(value, full: bool) -> str:
    """JSON of a value; without `full`, long lists and mappings show their first items and a count."""
    if full or not isinstance(value, (list, dict)) or len(value) <= 2 * SHOWN:
        return json.dumps(value)
    if isinstance(value, dict):
        head = ", ".join(f"{json.dumps(k)}: {_short(v, False)}" for k, v in list(value.items())[:SHOWN])
        return f"{{{head}, ... ({len(value)} entries)}}"
    return f"[{', '.join(_short(v, False) for v in value[:SHOWN])}, ... ({len(value)} items)]"


def cmd_dry_run(args: argparse.Namespace) -> int:
    from .config import load_config
    from .spaces import build_space

    if not args.config:
        raise UserError("--dry-run needs --config YAML")
    cfg = load_config(args.config, args.set)
    space = build_space(cfg.space, cfg.seed)
    info = space.describe()
    full = args.verbose
    print(f"dimension: {space.dim}")
    for key, value in info.items():
        if key not in ("dim", "layout"):
            print(f"{key}: {_short(value, full)}")
    layout = info.get("layout", [])
    if layout:
        rows = layout if full or len(layout) <= 2 * SHOWN else [*layout[:SHOWN], "...", *layout[-SHOWN:]]
        print(f"layout ({len(layout)} rows):")
        for row in rows:
            print(f"  {row}")
    if space.lower is not None:
        centre = (space.lower + space.upper) / 2
        recipe = space.recipe(centre)
        print("recipe at the centre:")
        if full:
            print(json.dumps(recipe, indent=2))
        else:
            for key, value in (recipe or {}).items():
                print(f"  {key}: {_short(value, False)}")
    print(f"strategy: {cfg.strategy.name}, fitness: {cfg.fitness.name}, {cfg.engine.workers} workers, "
          f"budget: {cfg.budget.max_evals or '-'} evaluations / {cfg.budget.max_seconds or '-'} s")
    if not full:
        print("(--verbose: every coordinate and the whole recipe)")
    plan = _memory_plan(cfg)
    if plan is not None:
        for line in plan.lines():
            print(line)
    return 0


def _workers_per_node(cfg) -> int:
    """Workers sharing a node's host memory: all of them in a local run; one assumed on a cluster."""
    return cfg.engine.workers if cfg.engine.address == "local" else 1


def _memory_plan(cfg, measure_h2d: bool = True):
    """A worker's memory plan for the run's space (None: the space has none)."""
    from .spaces import SPACES

    return SPACES[cfg.space.name][1].memory_plan(cfg.space, _workers_per_node(cfg), gpu_share=cfg.engine.gpu_share(),
                                                 measure_h2d=measure_h2d)


def _check_memory(cfg) -> None:
    """Refuse, before the run directory and Ray, a space whose worker's memory plan does not fit (from
    headers and configs: no weights are loaded, nothing is allocated on a GPU, the bandwidth is not measured)."""
    plan = _memory_plan(cfg, measure_h2d=False)
    if plan is not None and not plan.fits:
        raise UserError(plan.why)


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
    from .config import apply_sets, load_config, read_yaml, validate
    from .rundir import RunDir

    if args.resume:
        if args.config or args.out:
            raise UserError("--resume: the run directory holds its config; drop --config and --out")
        for item in args.set:
            if not item.startswith(RESUMABLE_SETS):
                raise UserError(f"--set {item}: a resumed run may change only {RESUMABLE_TEXT}")
        out = Path(args.resume)
        run = RunDir.open(out)  # locked and checked, before anything starts
    else:
        if not args.config:
            raise UserError("give --config YAML (a new run) or --resume RUN_DIR")
        cfg = load_config(args.config, args.set)
        _check_memory(cfg)
        out = Path(args.out) if args.out else default_out(args.config)
        run = RunDir.claim(out)  # created and locked, before anything starts; removed if we stop early
    try:
        if args.resume:
            cfg = validate(apply_sets(read_yaml(run.config_file), args.set))
            _check_memory(cfg)
        from .engine import search  # torch, Ray: only once the config and the run directory are known good

        with _deferred_signals() as early:
            summary = search(cfg, run, resume=bool(args.resume), config_changed=bool(args.resume and args.set),
                             progress=not args.no_progress, t_start=t_start,
                             on_start=lambda engine: _stop_on_signals(engine, early))
    finally:
        run.close()

    return _report_end(summary, cfg, out)


def _rounded(d: dict) -> dict:
    return {k: round(v, 4) if isinstance(v, float) else v for k, v in d.items()}


def _report_end(summary: dict, cfg, out: Path) -> int:
    """What the run did, in a few lines; the exit code (see --help)."""
    resume = f"{prog()} --resume {out}"
    best = summary.get("best", {})
    print(f"run directory: {out}")
    print(f"stopped by {summary['stop_reason']} after {summary['evaluations']} evaluations in "
          f"{summary['search_seconds']:.1f} s of search ({rate_text(summary['evals_per_second'])} evals/s, "
          f"start-up {summary['startup_seconds']:.1f} s)")
    if summary["failed"]:
        print(f"{summary['failed']} evaluations failed; last: {summary.get('last_failure')}")
    if best:
        print(f"best fitness {best['fitness']:.4f} (eval {best['eval_id']}); held-out: "
              + json.dumps(_rounded(best["holdout"])))
    reason = summary["stop_reason"]
    if reason == "fitness_stop":
        print(f"stopped by the fitness: {summary.get('last_failure')}; continue with: {resume}", file=sys.stderr)
    if reason == "interrupted":
        print(f"interrupted; continue with: {resume}", file=sys.stderr)
        return 130
    if reason == "no_workers":
        print(f"error: stopped: no worker is left ({summary.get('last_failure')}); continue with: {resume}",
              file=sys.stderr)
        return 1
    if reason == "too_many_failures":
        print(f"error: stopped: {summary['failed']} of {summary['evaluations']} evaluations failed (more than "
              f"engine.max_failure_fraction={cfg.engine.max_failure_fraction}); last: {summary.get('last_failure')}; "
              f"fix the fitness, then: {resume}", file=sys.stderr)
        return 1
    if summary["evaluations"] and summary["failed"] == summary["evaluations"]:
        print(f"error: every evaluation failed ({summary['failed']}); last: {summary.get('last_failure')}; "
              f"fix the fitness, then: {resume}", file=sys.stderr)
        return 1
    return 0


class _on_signals:
    """Ctrl-C and SIGTERM go to `_handle` while the context is held; the previous handlers come back after."""

    def _handle(self, signum, frame):
        raise NotImplementedError

    def __enter__(self):
        import signal

        self.old = {s: signal.signal(s, self._handle) for s in (signal.SIGINT, signal.SIGTERM)}
        return self

    def __exit__(self, *exc):
        import signal

        for s, h in self.old.items():
            signal.signal(s, h)


class _deferred_signals(_on_signals):
    """Ctrl-C or SIGTERM during start-up (Ray, the workers): remembered rather than raised inside Ray's start-up,
    and acted on as soon as the engine runs (it stops at once, with a checkpoint); a second one aborts."""

    pending = False

    def _handle(self, signum, frame):
        if self.pending:
            raise KeyboardInterrupt
        self.pending = True
        print("\nstopping once the workers are up (press Ctrl-C again to abort)", file=sys.stderr)


class _stop_on_signals(_on_signals):
    """Ctrl-C or SIGTERM: stop dispatching, checkpoint and shut down cleanly; a second one aborts. `early`: a
    signal that came during start-up (`_deferred_signals`), acted on now."""

    def __init__(self, engine, early: _deferred_signals | None = None):
        self.engine = engine
        if early is not None and early.pending:
            engine.stop_requested = "interrupted"

    def _handle(self, signum, frame):
        if self.engine.stop_requested:
            raise KeyboardInterrupt
        self.engine.stop_requested = "interrupted"
        print("\nstopping: writing a checkpoint (press Ctrl-C again to abort)", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        if argv[:1] == ["export"]:
            return cmd_export(argv[1:])
        if argv[:1] == ["serve"]:
            from .serve import serve_main

            return serve_main(argv[1:])
        if argv[:1] == ["zoo"]:
            from .demos.tinylm import zoo_main
            from .fitness.lm_tasks import accuracy_scorer

            return zoo_main(argv[1:], scorer=accuracy_scorer)
        if argv[:1] == ["report"]:
            from .report import report_main

            return report_main(argv[1:])
        command = None
        if argv[:1] == ["run"]:
            command, argv = "run", argv[1:]
        if not argv and command is None:
            _parser().print_help()
            return 0
        args = _parser(command).parse_args(argv)
        return cmd_dry_run(args) if args.dry_run else cmd_run(args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
