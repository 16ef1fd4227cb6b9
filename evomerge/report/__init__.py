"""`report RUN_DIR [RUN_DIR ...]`: PNG plots and a Markdown summary of finished (or
running) searches, read from their run directories; with several runs, also an overlay of their
best-so-far curves and a comparison table.

Everything comes from the run directory, read through evomerge.rundir: evals.jsonl (one record per
evaluation, streamed), strategy.jsonl (the strategy's statistics over time), workers.jsonl,
summary.json, config.yaml and the strategy's final archive in checkpoint.pkl (as the strategy's
`archive_view` shows it: M2N2's per-example scores). Each report directory is written into a temporary
directory first and then renamed into place, so a failed report leaves the previous one (or none),
never half of one.

The modules: read.py (a run's records as columns), figure.py and plots_*.py (the figures), markdown.py
(report.md), write.py (the report directories), this one (the command).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from ..errors import UserError
from ..rundir import is_run_dir
from .read import Run, not_a_run, read_run
from .write import report_compare, report_run


def _parser() -> argparse.ArgumentParser:
    from ..command import prog

    p = argparse.ArgumentParser(
        prog=prog("report"),
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Plot runs and summarise them in Markdown, from their run directories.",
        epilog="""\
writes RUN_DIR/report/ for each run (replaced as a whole when it exists):
  report.md     run name, config (strategy, space, fitness), stop reason, evaluations, failures,
                search time, evaluations/s, worker utilization, best fitness and its held-out
                metrics, and the plots below with a caption each
  fitness.png   every evaluation's fitness (markers, or a density image beyond 5,000) with the
                median and 10-90% band, and the best so far: vs evaluations, and vs search time
  tasks.png     per-task metrics (the fitness's objectives, else the logged metrics) of the best so
                far over evaluations, with each metric's own best so far
  strategy.png  the strategy's statistics over evaluations (strategy.jsonl): CMA-ES sigma (log
                axis), M2N2 archive fitness, coverage and diversity, ...
  archive.png   M2N2: the final archive's per-example scores, members x examples (examples sorted
                by how many members solve them), and how many members solve each example
  pareto.png    two or more objectives: every evaluation in the plane of the first two (a scatter
                matrix for more), the Pareto front highlighted
  workers.png   each worker's busy intervals over search time, worker replacements, and the
                utilization of all workers over time; with the records' timings (merge_s,
                score_s, transfer_s), each worker's mean seconds per candidate split into merge,
                scoring and the rest (transfer overlaps the merge: drawn inside it)
Plots whose data a run lacks are left out and report.md says why (e.g. records without the time
stamp `t`, logged by older versions: no plots over time).

with several runs, also writes --out DIR (default FIRST_RUN_DIR/report-compare/):
  report.md     a table per run (label, strategy, best fitness, evaluations, failures, search
                time, evaluations/s) and the overlay
  best.png      the runs' best fitness so far, vs evaluations and vs search time

examples:
  {prog} runs/quickstart-20250101-120000
  {prog} runs/m2n2 runs/cmaes --label M2N2 --label CMA-ES --out runs/compare""".replace("{prog}", prog("report")))
    p.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run directories (as written by a search)")
    p.add_argument("--out", metavar="DIR", help="where the comparison of several runs goes "
                   "(default FIRST_RUN_DIR/report-compare; replaced as a whole)")
    p.add_argument("--label", action="append", default=[], metavar="NAME",
                   help="name of a run in the comparison, once per RUN_DIR in order (default: the "
                        "directory's name and its strategy)")
    p.add_argument("--timings", action="store_true",
                   help="print, per run, the seconds spent reading and plotting as one JSON line on stderr")
    return p


def report_main(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    if args.label and len(args.label) != len(args.runs):
        raise UserError(f"--label: give one per run ({len(args.runs)} runs, {len(args.label)} labels)")
    if args.out and len(args.runs) < 2:
        raise UserError("--out: the comparison needs two or more runs (one run's report goes to RUN_DIR/report)")
    for p in args.runs:  # every path checked before anything is written
        if not Path(p).is_dir() or not is_run_dir(Path(p)):
            raise not_a_run(Path(p))
    runs = []
    for p in args.runs:
        t0 = time.perf_counter()
        run = read_run(p)
        read_s = time.perf_counter() - t0
        dest, timing = report_run(run)
        runs.append(run)
        print(dest / "report.md")
        if args.timings:
            print(json.dumps({"run": str(p), "evaluations": run.n, "read_s": round(read_s, 4),
                              "plot_s": round(timing["plot_s"], 4),
                              "total_s": round(time.perf_counter() - t0, 4)}), file=sys.stderr)
    if len(runs) > 1:
        labels = args.label or _default_labels(runs)
        dest = Path(args.out) if args.out else runs[0].path / "report-compare"
        print(report_compare(runs, labels, dest) / "report.md")
    return 0


def _default_labels(runs: list[Run]) -> list[str]:
    return [f"{r.name} ({r.strategy})" for r in runs]
