"""Writing report directories: RUN_DIR/report/ of one run and the comparison of several, each
written in a temporary directory and renamed into place (a failed report leaves the previous one)."""
from __future__ import annotations

import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from ..rundir import CHECKPOINT, EVALS, REPORT, STATS, SUMMARY
from .figure import POINTS_MAX
from .markdown import run_facts, write_compare, write_markdown
from .plots_fitness import plot_fitness, plot_overlay, plot_tasks, task_metrics
from .plots_pareto import MAX_PARETO, plot_pareto
from .plots_strategy import plot_archive, plot_strategy, stat_keys
from .plots_workers import plot_workers, split_caption
from .read import Run, keeps_archive, read_archive


class _Staged:
    """A directory written in a temporary sibling and renamed over `dest` on success."""

    def __init__(self, dest: Path):
        self.dest = Path(dest)

    def __enter__(self) -> Path:
        self.dest.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = Path(tempfile.mkdtemp(prefix=f".{self.dest.name}.tmp-", dir=self.dest.parent))
        return self.tmp

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            return
        os.chmod(self.tmp, 0o755)
        old = None
        if self.dest.exists():
            old = self.dest.with_name(f".{self.dest.name}.old-{os.getpid()}")
            os.rename(self.dest, old)
        os.rename(self.tmp, self.dest)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)


def notes_on(run: Run) -> list[str]:
    """What report.md notes of the run's records before any plot: a missing summary, a torn last line,
    records without time stamps."""
    notes = []
    if run.summary is None:
        notes.append(f"no {SUMMARY} (the run is still going, or was killed): figures come from the records")
    if run.torn:
        notes.append(f"the last line of {EVALS} is incomplete (being written, or the driver was killed)")
    missing_t = int(np.isnan(run.t).sum())
    if not run.has_t:
        notes.append("the records have no time stamp `t` (logged by an older version): no plots over search time")
    elif missing_t:
        notes.append(f"{missing_t} of {run.n} records have no time stamp `t` (logged by an older version): "
                     "the plots over time show the others")
    return notes


def report_run(run: Run) -> tuple[Path, dict]:
    """Write RUN_DIR/report/; returns its path and the seconds spent per part."""
    timing = {}
    images: list[tuple[str, str]] = []  # (file, caption) of each plot drawn
    dest = run.path / REPORT
    with _Staged(dest) as out:
        t0 = time.perf_counter()
        facts = run_facts(run)
        notes = notes_on(run)
        plot_fitness(run, out / "fitness.png")
        images.append(("fitness.png", "every evaluation's fitness and the best so far, vs evaluations"
                       + (" and vs search time" if run.has_t else "")
                       + (" (density image: darker = more evaluations)" if run.n > POINTS_MAX else "")))
        names = task_metrics(run)
        if names:
            plot_tasks(run, names, out / "tasks.png")
            what = "objectives" if run.objectives else "metrics"
            images.append(("tasks.png", f"the {what} {', '.join(names)} of the best evaluation so far (solid) "
                                        "and each one's own best so far (dashed)"))
        else:
            notes.append("no numeric metrics in the records: no tasks.png")
        keys = stat_keys(run)
        if keys:
            plot_strategy(run, keys, out / "strategy.png")
            images.append(("strategy.png", f"{run.strategy}'s statistics over evaluations, from {STATS}"))
        elif run.stats:
            notes.append(f"{STATS} holds no statistics ({run.strategy} reports none): no strategy.png")
        else:
            notes.append(f"no {STATS} (a run of an older version): no strategy.png")
        archive = read_archive(run)
        if archive is not None:
            cov = plot_archive(run, archive, out / "archive.png")
            images.append(("archive.png", f"the final archive's per-example scores, members (best first) x "
                                          f"examples (most solved first); coverage {cov:.3f}"))
        elif keeps_archive(run):
            notes.append(f"no scored archive in {CHECKPOINT}: no archive.png")
        objectives = [k for k in run.objectives if k in run.metrics]
        if len(objectives) >= 2:
            size = plot_pareto(run, objectives, out / "pareto.png")
            images.append(("pareto.png", f"every evaluation over the objectives {', '.join(objectives[:MAX_PARETO])}; "
                                         f"the Pareto front ({size} evaluations) in red"))
        if run.has_t:
            util = plot_workers(run, out / "workers.png")
            if facts["utilization"] is None:
                facts["utilization"] = round(util, 4)
            images.append(("workers.png", "each worker's busy intervals over search time (replacements: red x) "
                                          f"and the busy fraction of all workers (mean {util:.2f})"
                           + split_caption(run)))
        timing["plot_s"] = time.perf_counter() - t0
        write_markdown(run, facts, images, notes, out / "report.md")
    return dest, timing


def report_compare(runs: list[Run], labels: list[str], dest: Path) -> Path:
    """Write the comparison of `runs` (named `labels`) into directory `dest`; returns it."""
    with _Staged(dest) as out:
        plot_overlay(runs, labels, out / "best.png")
        write_compare(runs, labels, dest, out / "report.md")
    return dest
