"""`report RUN_DIR [RUN_DIR ...]`: PNG plots and a Markdown summary of finished (or
running) searches, read from their run directories; with several runs, also an overlay of their
best-so-far curves and a comparison table.

Everything comes from the run directory: evals.jsonl (one record per evaluation, streamed),
strategy.jsonl (the strategy's statistics over time), workers.jsonl, summary.json, config.yaml and,
for M2N2, the final archive's per-example scores in checkpoint.pkl. Each report directory is written
into a temporary directory first and then renamed into place, so a failed report leaves the previous
one (or none), never half of one.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import pickle
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import UserError

TIMING_KEYS = ("merge_s", "transfer_s", "score_s")  # per evaluated candidate, as the engine logs them
MAX_METRICS = 12  # tasks.png: at most this many metrics
MAX_STATS = 12  # strategy.png: at most this many panels
MAX_PARETO = 5  # pareto.png: a scatter matrix over at most this many objectives
POINTS_MAX = 5000  # more evaluations than this are drawn as a density image, not as markers
CHECKPOINT_MAX_BYTES = 2 << 30  # archive.png: larger checkpoints are not unpickled


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


# reading ---------------------------------------------------------------------------------------
@dataclass
class Run:
    path: Path
    name: str
    config: dict
    summary: dict | None
    n: int
    ids: np.ndarray
    fitness: np.ndarray  # NaN where failed
    failed: np.ndarray
    cached: np.ndarray
    worker: np.ndarray  # -1: none (cached, failed without a worker)
    seconds: np.ndarray  # NaN: none
    t: np.ndarray  # NaN: no time stamp (records of older versions)
    metrics: dict[str, np.ndarray]
    objectives: list[str]
    stats: list[dict] = field(default_factory=list)
    events: list[dict] = field(default_factory=list)
    torn: bool = False  # the last line of evals.jsonl was cut off (a run being written, or killed)
    timing: dict[str, np.ndarray] = field(default_factory=dict)  # merge_s, score_s, transfer_s (NaN: none)

    @property
    def strategy(self) -> str:
        return str((self.config.get("strategy") or {}).get("name", "?"))

    @property
    def has_t(self) -> bool:
        return bool(np.isfinite(self.t).any())

    def best_so_far(self) -> np.ndarray:
        f = np.where(np.isnan(self.fitness), -np.inf, self.fitness)
        return np.maximum.accumulate(f)

    def best_index(self) -> np.ndarray:
        """Index of the best evaluation so far after each record (-1 before the first success);
        the first of equal fitnesses, as the engine keeps it."""
        f = np.where(np.isnan(self.fitness), -np.inf, self.fitness)
        prev = np.concatenate([[-np.inf], np.maximum.accumulate(f)[:-1]])
        new = f > prev
        return np.maximum.accumulate(np.where(new, np.arange(self.n), -1))

    def workers_count(self) -> int:
        w = (self.config.get("engine") or {}).get("workers")
        seen = int(self.worker.max()) + 1 if self.n else 0
        return max(int(w) if isinstance(w, int) else 0, seen, 1)


def _is_run(path: Path) -> bool:
    return (path / "config.yaml").is_file() and (path / "evals.jsonl").is_file()


def read_run(path: str | Path) -> Run:
    import yaml

    path = Path(path)
    if not path.is_dir() or not _is_run(path):
        raise UserError(f"report {path}: not a run directory (config.yaml and evals.jsonl expected)")
    try:
        config = yaml.safe_load((path / "config.yaml").read_text()) or {}
    except yaml.YAMLError:
        config = {}
    if not isinstance(config, dict):
        config = {}
    summary = None
    if (path / "summary.json").is_file():
        try:
            summary = json.loads((path / "summary.json").read_text())
        except json.JSONDecodeError:
            summary = None

    ids, fit, failed, cached, worker, seconds, t = [], [], [], [], [], [], []
    timing: dict[str, list] = {k: [] for k in TIMING_KEYS}
    metrics: dict[str, list] = {}
    torn = False
    loads, nan = json.loads, math.nan
    with open(path / "evals.jsonl", "rb") as f:
        for line in f:
            try:
                r = loads(line)
            except ValueError:
                if line.strip():
                    torn = True  # a torn line (the driver was killed while writing it)
                continue
            i = len(ids)
            ids.append(r.get("id", i))
            v = r.get("fitness")
            fit.append(nan if v is None else v)
            failed.append(bool(r.get("failed")))
            cached.append(r.get("cached_from") is not None)
            w = r.get("worker")
            worker.append(-1 if w is None else w)
            s = r.get("seconds")
            seconds.append(nan if s is None else s)
            s = r.get("t")
            t.append(nan if s is None else s)
            if "score_s" in r:  # timings: absent from cached and failed records, and in older versions
                for k, col in timing.items():
                    s = r.get(k)
                    if type(s) in (float, int):
                        col.append((i, s))
            m = r.get("metrics")
            if m:
                for k, v in m.items():
                    col = metrics.get(k)
                    if col is None:
                        col = metrics[k] = [nan] * i
                    col.append(v if type(v) in (float, int) else nan)
            for col in metrics.values():  # a metric missing from this record
                if len(col) == i:
                    col.append(nan)
    n = len(ids)
    if n == 0:
        raise UserError(f"report {path}: evals.jsonl holds no evaluation yet")
    run = Run(path=path, name=path.resolve().name, config=config, summary=summary, n=n,
              ids=np.asarray(ids, np.int64), fitness=np.asarray(fit, np.float64), failed=np.asarray(failed),
              cached=np.asarray(cached), worker=np.asarray(worker, np.int64),
              seconds=np.asarray(seconds, np.float64), t=np.asarray(t, np.float64),
              metrics={k: np.asarray(v, np.float64) for k, v in metrics.items()},
              objectives=_objectives(config, summary), torn=torn,
              timing={k: _sparse(v, n) for k, v in timing.items() if v})
    run.stats = _read_jsonl(path / "strategy.jsonl")
    run.events = _read_jsonl(path / "workers.jsonl")
    return run


def _sparse(pairs: list[tuple[int, float]], n: int) -> np.ndarray:
    out = np.full(n, np.nan)
    idx, vals = zip(*pairs)
    out[list(idx)] = vals
    return out


def _read_jsonl(path: Path) -> list[dict]:
    out = []
    if path.is_file():
        with open(path, "rb") as f:
            for line in f:
                try:
                    out.append(json.loads(line))
                except ValueError:
                    continue
    return out


def _objectives(config: dict, summary: dict | None) -> list[str]:
    """The fitness's objectives: from summary.json's Pareto front, else from the fitness class."""
    if summary is not None:
        return list((summary.get("pareto_front") or {}).get("objectives") or [])
    try:
        from evomerge.fitness import FITNESSES

        cfg = dict(config["fitness"])
        cfg_cls, cls = FITNESSES[cfg["name"]]
        return list(cls.objectives(cfg_cls(**cfg)))
    except Exception:  # noqa: BLE001 - an old or foreign config: no objectives known
        return []


def read_archive(run: Run) -> dict | None:
    """M2N2: the final archive's per-example scores (filled slots) and member fitness, from
    checkpoint.pkl. None when the run is not M2N2, has no checkpoint, or no scored member."""
    ckpt = run.path / "checkpoint.pkl"
    if run.strategy != "m2n2" or not ckpt.is_file() or ckpt.stat().st_size > CHECKPOINT_MAX_BYTES:
        return None
    try:
        with open(ckpt, "rb") as f:
            state = pickle.load(f)["strategy"]
    except Exception:  # noqa: BLE001 - unreadable or foreign checkpoint: no archive plot
        return None
    scores = state.get("scores")
    if scores is None:
        return None
    scores = np.asarray(scores, np.float64)
    filled = state.get("filled")  # slots that received a member (older checkpoints: those scoring something)
    occupied = np.flatnonzero(scores.any(axis=1) if filled is None else np.asarray(filled, bool))
    if not len(occupied):
        return None
    fit = state.get("member_fitness")
    fit = np.full(len(scores), np.nan) if fit is None else np.asarray(fit, np.float64)
    fit = np.where(np.isfinite(fit), fit, scores.mean(axis=1))[occupied]
    return {"scores": scores[occupied], "fitness": fit}


def pareto_mask(points: np.ndarray) -> np.ndarray:
    """Rows of `points` (higher is better) no other row beats on every column; of equal rows, the first."""
    n = len(points)
    keep = np.zeros(n, bool)
    if n == 0:
        return keep
    uniq, first = np.unique(points, axis=0, return_index=True)
    order = np.lexsort(uniq.T[::-1])[::-1]  # lexicographically descending: no later row dominates an earlier one
    front: list[np.ndarray] = []
    for j in order:
        p = uniq[j]
        if front:
            f = np.asarray(front)
            if np.any(np.all(f >= p, axis=1)):  # unique rows: >= everywhere means dominates
                continue
        front.append(p)
        keep[first[j]] = True
    return keep


# plotting --------------------------------------------------------------------------------------
def _figure(w: float, h: float, left: float = 0.8, right: float = 0.25, top: float = 0.45, bottom: float = 0.55,
            hspace: float = 0.35, wspace: float = 0.25):
    """A figure with fixed margins (in inches): a layout engine would cost more than all the drawing."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    fig = Figure(figsize=(w, h), dpi=100)
    fig.subplots_adjust(left=left / w, right=1 - right / w, top=1 - top / h, bottom=bottom / h,
                        hspace=hspace, wspace=wspace)
    return fig


def _save(fig, path: Path) -> None:
    fig.savefig(path, dpi=100, pil_kwargs={"compress_level": 3})  # zlib's default 6: 2x slower, 10% smaller


def _density(ax, x: np.ndarray, y: np.ndarray, label: str, ylim: tuple[float, float] | None = None) -> None:
    """Every point: markers when few, else a log-scaled 2-D histogram (fast and legible at 50k)."""
    ok = np.isfinite(x) & np.isfinite(y)
    x, y = x[ok], y[ok]
    if not len(x):
        return
    if len(x) <= POINTS_MAX:
        ax.plot(x, y, ".", ms=2.5, alpha=0.35, color="tab:blue", label=label, rasterized=True)
        return
    from matplotlib.colors import LogNorm

    x0, x1 = float(x.min()), float(x.max())
    y0, y1 = ylim if ylim is not None else (float(y.min()), float(y.max()))
    x1, y1 = (x1 if x1 > x0 else x0 + 1), (y1 if y1 > y0 else y0 + 1e-9)
    h, xe, ye = np.histogram2d(x, y, bins=(300, 150), range=((x0, x1), (y0, y1)))
    h[h == 0] = np.nan
    ax.imshow(h.T, origin="lower", aspect="auto", extent=(x0, x1, y0, y1), cmap="Blues",
              norm=LogNorm(vmin=1, vmax=max(2.0, float(np.nanmax(h)))), interpolation="nearest")
    ax.plot([], [], "s", color="tab:blue", alpha=0.5, label=f"{label} (density)")


def _fitness_range(fitness: np.ndarray, best: np.ndarray) -> tuple[tuple[float, float] | None, str]:
    """y limits that leave out the worst 2% of evaluations when those stretch the axis more than
    2.5 times (e.g. the seeds and first children of a long run): the bulk stays legible."""
    f = fitness[np.isfinite(fitness)]
    if len(f) < 100:
        return None, "fitness"
    lo, q, hi = float(f.min()), float(np.percentile(f, 2)), float(f.max())
    if hi - lo <= 2.5 * (hi - q) or hi <= q:
        return None, "fitness"
    pad = 0.06 * (hi - q)
    cut = int((f < q - pad).sum())
    return (q - pad, hi + pad), f"fitness ({cut} below cut off)"


def _band(ax, x: np.ndarray, y: np.ndarray, bins: int = 120) -> None:
    """Median and 10-90% quantiles of y in equal-count chunks along x."""
    ok = np.isfinite(x) & np.isfinite(y)
    x, y = x[ok], y[ok]
    if len(x) < 200:
        return
    order = np.argsort(x, kind="stable")
    x, y = x[order], y[order]
    k = min(bins, len(x) // 20)
    edges = np.linspace(0, len(x), k + 1).astype(int)
    xs = np.array([x[a:b].mean() for a, b in zip(edges[:-1], edges[1:])])
    q = np.array([np.percentile(y[a:b], (10, 50, 90)) for a, b in zip(edges[:-1], edges[1:])])
    ax.fill_between(xs, q[:, 0], q[:, 2], color="tab:orange", alpha=0.2, lw=0, label="10-90% of evaluations")
    ax.plot(xs, q[:, 1], color="tab:orange", lw=1, label="median")


def plot_fitness(run: Run, path: Path) -> None:
    panels = [("evaluations", np.arange(1, run.n + 1, dtype=np.float64))]
    if run.has_t:
        panels.append(("search time (s)", run.t))
    fig = _figure(10, 3.6 * len(panels))
    axes = fig.subplots(len(panels), 1, squeeze=False)[:, 0]
    best = run.best_so_far()
    ylim, ylabel = _fitness_range(run.fitness, best)
    for ax, (xlabel, x) in zip(axes, panels):
        _density(ax, x, run.fitness, "evaluations", ylim)
        _band(ax, x, run.fitness)
        ok = np.isfinite(x) & np.isfinite(best)
        ax.step(x[ok], best[ok], where="post", color="tab:red", lw=1.6, label="best so far")
        if run.failed.any():
            fx = x[run.failed & np.isfinite(x)]
            lo = ylim[0] if ylim is not None else np.nanmin(run.fitness) if np.isfinite(run.fitness).any() else 0.0
            ax.plot(fx, np.full(len(fx), lo), "|", color="black", ms=6, alpha=0.6,
                    label=f"failed ({int(run.failed.sum())})")
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        if ylim is not None:
            ax.set_ylim(*ylim)
        ax.grid(alpha=0.3)
        ax.legend(loc="lower right", fontsize=8)
    axes[0].set_title(f"{run.name}: fitness ({run.strategy}, {run.n} evaluations)")
    _save(fig, path)


def task_metrics(run: Run) -> list[str]:
    names = [k for k in run.objectives if k in run.metrics]
    if not names:
        names = [k for k, v in run.metrics.items() if not k.startswith("dloss/") and np.isfinite(v).any()]
    return names[:MAX_METRICS]


def plot_tasks(run: Run, names: list[str], path: Path) -> None:
    import matplotlib

    x = np.arange(1, run.n + 1, dtype=np.float64)
    idx = run.best_index()
    ok = idx >= 0
    fig = _figure(10, 4.5)
    ax = fig.subplots()
    colors = matplotlib.colormaps["tab10" if len(names) <= 10 else "tab20"]
    for i, name in enumerate(names):
        col = run.metrics[name]
        v = np.full(run.n, np.nan)
        v[ok] = col[idx[ok]]
        c = colors(i % colors.N)
        ax.step(x, v, where="post", color=c, lw=1.5, label=f"{name} (best so far's)")
        own = np.fmax.accumulate(np.where(run.failed, np.nan, col))
        ax.step(x, own, where="post", color=c, lw=0.8, ls="--", alpha=0.7)
    ax.plot([], [], color="gray", ls="--", lw=0.8, label="each metric's own best so far")
    ax.set_xlabel("evaluations")
    ax.set_ylabel("metric")
    ax.set_title(f"{run.name}: per-task metrics of the best so far")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right", ncol=2 if len(names) > 6 else 1)
    _save(fig, path)


def _stat_panels(keys: list[str]) -> list[list[str]]:
    """Fitness-like statistics share a panel; every other one has its own."""
    fitlike = [k for k in keys if "fitness" in k or k in ("generation_best", "generation_median")]
    panels = [fitlike] if fitlike else []
    panels += [[k] for k in keys if k not in fitlike]
    return panels[:MAX_STATS]


def stat_keys(run: Run) -> list[str]:
    keys: list[str] = []
    for e in run.stats:
        for k in e:
            if k not in ("evals", "t") and k not in keys:
                keys.append(k)
    return keys


def plot_strategy(run: Run, keys: list[str], path: Path) -> None:
    panels = _stat_panels(keys)
    ncol = 3 if len(panels) > 4 else 2 if len(panels) > 1 else 1
    nrow = math.ceil(len(panels) / ncol)
    fig = _figure(4.2 * ncol, 2.8 * nrow + 0.4, left=0.7, top=0.75, hspace=0.55, wspace=0.3)
    axes = fig.subplots(nrow, ncol, squeeze=False).ravel()
    x = np.array([e.get("evals", np.nan) for e in run.stats], np.float64)
    for ax, panel in zip(axes, panels):
        for k in panel:
            y = np.array([e.get(k, np.nan) for e in run.stats], np.float64)
            ax.plot(x, y, lw=1.3, marker="." if len(x) < 60 else None, label=k)
            positive = np.isfinite(y) & (y > 0)
            if (k in ("sigma", "std_mean", "gamma") and positive.any()
                    and np.all(y[np.isfinite(y)] > 0)):
                ax.set_yscale("log")
        if len(panel) > 1:
            ax.legend(fontsize=7)
            ax.set_title("fitness", fontsize=9)
        else:
            ax.set_title(panel[0], fontsize=9)
        ax.set_xlabel("evaluations", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
    for ax in axes[len(panels):]:
        ax.set_visible(False)
    fig.suptitle(f"{run.name}: {run.strategy} statistics (strategy.jsonl)", fontsize=10)
    _save(fig, path)


def plot_archive(run: Run, archive: dict, path: Path) -> float:
    """Heatmap of the final archive; returns its coverage (mean over examples of the best score)."""
    scores, fit = archive["scores"], archive["fitness"]
    rows = np.argsort(-fit, kind="stable")
    solvers = scores.sum(axis=0)
    cols = np.argsort(-solvers, kind="stable")
    s = scores[rows][:, cols]
    coverage = float(scores.max(axis=0).mean())
    m, e = s.shape
    fig = _figure(10, 6, left=0.9, right=1.0, hspace=0.08)
    top, bottom = fig.subplots(2, 1, height_ratios=(max(2.0, min(m, 40) / 6), 1.4), sharex=True)
    vmax = max(1.0, float(s.max()))
    im = top.imshow(s, aspect="auto", interpolation="nearest" if e <= 2000 else "antialiased",
                    cmap="Greens", vmin=min(0.0, float(s.min())), vmax=vmax, extent=(-0.5, e - 0.5, m - 0.5, -0.5))
    box = top.get_position()
    fig.colorbar(im, cax=fig.add_axes((box.x1 + 0.015, box.y0, 0.015, box.height)), label="score")
    if m <= 30:
        top.set_yticks(range(m), [f"{f:.4g}" for f in fit[rows]], fontsize=7)
        top.set_ylabel("member (its fitness)")
    else:
        top.set_ylabel("member (best first)")
    top.set_title(f"{run.name}: final M2N2 archive, {m} members x {e} examples "
                  f"(coverage {coverage:.3f})", fontsize=10)
    binary = bool(np.all((scores == 0) | (scores == 1)))
    bottom.fill_between(np.arange(e), solvers[cols], step="mid", color="tab:green", alpha=0.5)
    bottom.plot(np.arange(e), solvers[cols], drawstyle="steps-mid", color="tab:green", lw=1)
    unsolved = int((scores.max(axis=0) <= 0).sum())
    bottom.set_ylabel("members solving" if binary else "sum of scores", fontsize=8)
    bottom.set_xlabel(f"example (sorted by how many members solve it; {unsolved} solved by none)" if binary else
                      f"example (sorted by the members' summed score; {unsolved} scored 0 by all)")
    bottom.set_xlim(-0.5, e - 0.5)
    bottom.grid(alpha=0.3)
    _save(fig, path)
    return coverage


def plot_pareto(run: Run, names: list[str], path: Path) -> int:
    """Returns the size of the front."""
    names = names[:MAX_PARETO]
    ok = ~run.failed & ~run.cached
    cols = np.stack([run.metrics[k] for k in names], axis=1)
    ok &= np.all(np.isfinite(cols), axis=1)
    pts = cols[ok]
    front = pts[pareto_mask(pts)]
    k = len(names)
    if k == 2:
        fig = _figure(7, 6, left=0.9)
        axes = np.array([[fig.subplots()]])
        pairs = [(0, 0, 0, 1)]
    else:
        side = max(3.0, 7.0 / (k - 1))
        fig = _figure(side * (k - 1), side * (k - 1), left=0.9, top=0.55, hspace=0.4, wspace=0.4)
        axes = fig.subplots(k - 1, k - 1, squeeze=False)
        pairs = [(r - 1, c, c, r) for r in range(1, k) for c in range(r)]
        for r in range(k - 1):
            for c in range(r + 1, k - 1):
                axes[r, c].set_visible(False)
    for r, c, i, j in pairs:
        ax = axes[r, c]
        if len(pts) <= POINTS_MAX:
            ax.plot(pts[:, i], pts[:, j], ".", ms=3, alpha=0.3, color="tab:blue", label="evaluations")
        else:
            ax.hexbin(pts[:, i], pts[:, j], gridsize=70, bins="log", mincnt=1, cmap="Blues")
            ax.plot([], [], "h", color="tab:blue", alpha=0.5, label="evaluations (density)")
        if k == 2:
            f = front[np.argsort(front[:, i])]
            ax.plot(f[:, i], f[:, j], "o-", color="tab:red", ms=5, lw=1.2, drawstyle="steps-post",
                    label=f"Pareto front ({len(front)})")
        else:
            ax.plot(front[:, i], front[:, j], "o", color="tab:red", ms=3, label="Pareto front")
        ax.set_xlabel(names[i], fontsize=8)
        ax.set_ylabel(names[j], fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
    axes[0, 0].legend(fontsize=8, loc="lower left")
    fig.suptitle(f"{run.name}: evaluations over the objectives ({len(front)} on the front)", fontsize=10)
    _save(fig, path)
    return len(front)


def busy_intervals(run: Run) -> dict[int, np.ndarray]:
    """Per worker, (start, end) in search seconds of each call: records with the same worker and
    told at the same t are one batch, busy the sum of their seconds up to t."""
    ok = (run.worker >= 0) & np.isfinite(run.t) & np.isfinite(run.seconds)
    out: dict[int, np.ndarray] = {}
    w, t, s = run.worker[ok], run.t[ok], run.seconds[ok]
    for k in np.unique(w):
        tk, sk = t[w == k], s[w == k]
        ends, inv = np.unique(tk, return_inverse=True)
        busy = np.bincount(inv, weights=sk)
        out[int(k)] = np.stack([ends - busy, ends], axis=1)
    return out


def _merge(iv: np.ndarray, gap: float) -> np.ndarray:
    """Join intervals closer than `gap` (what would be one bar on the plot anyway)."""
    if len(iv) < 2:
        return iv
    iv = iv[np.argsort(iv[:, 0])]
    ends = np.maximum.accumulate(iv[:, 1])
    split = iv[1:, 0] > ends[:-1] + gap
    starts = np.concatenate([[0], np.flatnonzero(split) + 1])
    last = np.concatenate([starts[1:] - 1, [len(iv) - 1]])
    return np.stack([iv[starts, 0], ends[last]], axis=1)


def utilization(intervals: dict[int, np.ndarray], workers: int, edges: np.ndarray) -> np.ndarray:
    """Busy fraction of all workers in each bin [edges[i], edges[i + 1])."""
    if not intervals:
        return np.zeros(len(edges) - 1)
    iv = np.concatenate(list(intervals.values()))
    start, length = iv[:, 0], iv[:, 1] - iv[:, 0]
    # busy seconds before x, summed over intervals: sum_i clip(x - start_i, 0, length_i)
    cum = np.array([np.clip(x - start, 0, length).sum() for x in edges])
    return np.diff(cum) / (workers * np.diff(edges))


def plot_workers(run: Run, path: Path) -> float:
    """Returns the mean utilization over the search time the records cover."""
    intervals = busy_intervals(run)
    workers = run.workers_count()
    end = float(np.nanmax(run.t))
    end = end if end > 0 else 1.0
    split = time_split(run)
    rows = max(1.0, 0.35 * min(workers, 32) + 0.8)
    heights = (rows, 2.2) + ((rows,) if split else ())
    fig = _figure(10, 2.6 + 0.35 * min(workers, 32) + 2.4 + (rows + 1.0 if split else 0.0))
    axes = fig.subplots(len(heights), 1, height_ratios=heights)
    top, bottom = axes[0], axes[1]
    top.sharex(bottom)
    top.tick_params(labelbottom=False)
    gap = end / 2000
    for w in range(workers):
        iv = _merge(intervals.get(w, np.zeros((0, 2))), gap)
        if len(iv):
            top.broken_barh(list(zip(iv[:, 0], iv[:, 1] - iv[:, 0])), (w - 0.4, 0.8), color="tab:blue", lw=0)
    replaced = [e for e in run.events if e.get("event") == "replaced" and e.get("t") is not None]
    if replaced:
        top.plot([e["t"] for e in replaced], [e.get("worker", 0) for e in replaced], "x", color="tab:red", ms=9,
                 mew=2, label=f"replaced ({len(replaced)})")
        top.legend(fontsize=8, loc="upper right")
    top.set_yticks(range(workers) if workers <= 32 else np.linspace(0, workers - 1, 8).astype(int))
    top.set_ylim(-0.6, workers - 0.4)
    top.invert_yaxis()
    top.set_ylabel("worker")
    top.set_title(f"{run.name}: worker busy intervals and utilization", fontsize=10)
    edges = np.linspace(0.0, end, 101)
    u = utilization(intervals, workers, edges)
    mean = float(utilization(intervals, workers, np.array([0.0, end]))[0])
    bottom.step(edges[:-1], u, where="post", color="tab:green", lw=1.3, label="utilization")
    bottom.axhline(mean, color="gray", ls="--", lw=1, label=f"mean {mean:.2f}")
    for e in replaced:
        bottom.axvline(e["t"], color="tab:red", lw=0.8, alpha=0.5)
    bottom.set_ylim(0, 1.05)
    bottom.set_ylabel("busy fraction")
    bottom.set_xlabel("search time (s)")
    bottom.set_xlim(0, end)
    bottom.grid(alpha=0.3)
    bottom.legend(fontsize=8, loc="lower right")
    if split:
        _plot_split(axes[2], split)
    _save(fig, path)
    return mean


def _split_caption(run: Run) -> str:
    if "score_s" not in run.timing:
        return ""
    parts = ", ".join((["merge"] if "merge_s" in run.timing else []) + ["score", "other"])
    return (f"; each worker's mean seconds per evaluated candidate: {parts}"
            + (" (transfer, drawn inside the merge bar, overlaps the merge)" if "transfer_s" in run.timing else ""))


def time_split(run: Run) -> dict[int, dict[str, float]]:
    """Per worker, mean seconds per evaluated candidate (the records with score_s): merge_s, score_s,
    transfer_s (when measured) and other (the rest of the record's seconds: decoding, packing, ...)."""
    score = run.timing.get("score_s")
    if score is None:
        return {}
    out = {}
    for w in np.unique(run.worker[(run.worker >= 0) & np.isfinite(score)]):
        ok = (run.worker == w) & np.isfinite(score)
        d = {k: float(np.nanmean(v[ok])) for k, v in run.timing.items() if np.isfinite(v[ok]).any()}
        busy = float(np.nanmean(run.seconds[ok])) if np.isfinite(run.seconds[ok]).any() else 0.0
        d["other"] = max(0.0, busy - d.get("merge_s", 0.0) - d["score_s"])
        out[int(w)] = d
    return out


def _plot_split(ax, split: dict[int, dict[str, float]]) -> None:
    """One stacked bar per worker: merge, score, other; transfer (overlapping the merge) drawn inside it."""
    ws = np.array(sorted(split))
    get = lambda k: np.array([split[w].get(k, 0.0) for w in ws])  # noqa: E731
    left = np.zeros(len(ws))
    for k, color, label in (("merge_s", "tab:orange", "merge"), ("score_s", "tab:blue", "score"),
                            ("other", "lightgray", "other")):
        v = get(k)
        if k == "merge_s" and not v.any():
            continue
        ax.barh(ws, v, left=left, height=0.8, color=color, label=label)
        left += v
    if any("transfer_s" in d for d in split.values()):
        ax.barh(ws, get("transfer_s"), height=0.3, color="tab:purple", label="transfer (within merge)")
    ax.set_yticks(ws if len(ws) <= 32 else ws[np.linspace(0, len(ws) - 1, 8).astype(int)])
    ax.invert_yaxis()
    ax.set_ylabel("worker")
    ax.set_xlabel("mean seconds per evaluated candidate (not cached, not failed)")
    ax.grid(alpha=0.3, axis="x")
    ax.legend(fontsize=8, loc="lower right", bbox_to_anchor=(1.0, 1.0), ncol=4, frameon=False, borderaxespad=0.2)


def plot_overlay(runs: list[Run], labels: list[str], path: Path) -> None:
    any_t = any(r.has_t for r in runs)
    fig = _figure(10, 3.8 * (2 if any_t else 1))
    axes = fig.subplots(2 if any_t else 1, 1, squeeze=False)[:, 0]
    for run, label in zip(runs, labels):
        best = run.best_so_far()
        ok = np.isfinite(best)
        x = np.arange(1, run.n + 1, dtype=np.float64)
        (line,) = axes[0].step(x[ok], best[ok], where="post", lw=1.5, label=label)
        if any_t and run.has_t:
            okt = ok & np.isfinite(run.t)
            axes[1].step(run.t[okt], best[okt], where="post", lw=1.5, color=line.get_color(), label=label)
    axes[0].set_xlabel("evaluations")
    if any_t:
        axes[1].set_xlabel("search time (s)")
    for ax in axes:
        ax.set_ylabel("best fitness so far")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="lower right")
    axes[0].set_title("best fitness so far")
    _save(fig, path)


# Markdown --------------------------------------------------------------------------------------
def _fmt(v, digits: int = 4) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        if not math.isfinite(v):
            return str(v)
        return f"{v:.{digits}g}" if abs(v) < 1e5 else f"{v:.3e}"
    return str(v)


def _facts(run: Run) -> dict:
    """What report.md and the comparison table say of a run: summary.json's figures, else from the records."""
    s = run.summary or {}
    best_i = int(run.best_index()[-1])
    t_end = float(np.nanmax(run.t)) if run.has_t else None
    seconds = s.get("search_seconds", t_end)
    evals_per_s = s.get("evals_per_second")
    if evals_per_s is None and seconds:
        evals_per_s = round(run.n / seconds, 2)
    best = s.get("best") or {}
    return {
        "evaluations": s.get("evaluations", run.n), "failed": s.get("failed", int(run.failed.sum())),
        "cached": s.get("cached", int(run.cached.sum())), "retried": s.get("retried"),
        "stop_reason": s.get("stop_reason", "- (no summary.json: running, or killed)"),
        "seconds": seconds, "evals_per_s": evals_per_s, "sessions": s.get("sessions"),
        "utilization": s.get("worker_utilization"), "replacements": s.get("worker_replacements"),
        "best_fitness": best.get("fitness", float(run.fitness[best_i]) if best_i >= 0 else None),
        "best_id": best.get("eval_id", int(run.ids[best_i]) if best_i >= 0 else None),
        "holdout": best.get("holdout"),
        "time_per_candidate": s.get("time_per_candidate") or _time_per_candidate(run),
    }


def _time_per_candidate(run: Run) -> dict:
    """As summary.json's time_per_candidate, from the records (no summary.json: a run still going)."""
    score = run.timing.get("score_s")
    if score is None:
        return {}
    out = {"candidates": int(np.isfinite(score).sum())}
    out.update({k: float(np.nanmean(v)) for k, v in run.timing.items()})
    return out


def _table(rows: list[tuple[str, str]]) -> str:
    return "\n".join(["| | |", "| --- | --- |"] + [f"| {k} | {v} |" for k, v in rows])


def write_markdown(run: Run, facts: dict, images: list[tuple[str, str]], notes: list[str], path: Path) -> None:
    cfg = run.config
    name = lambda sec: str((cfg.get(sec) or {}).get("name", "?"))  # noqa: E731
    rows = [("run directory", f"`{run.path}`"),
            ("strategy / space / fitness", f"{name('strategy')} / {name('space')} / {name('fitness')}"),
            ("stopped by", str(facts["stop_reason"])),
            ("evaluations", f"{facts['evaluations']} ({facts['failed']} failed, {facts['cached']} from the cache"
                            + (f", {facts['retried']} retried" if facts.get("retried") else "") + ")"),
            ("search time", "-" if facts["seconds"] is None else f"{facts['seconds']:.1f} s"
             + (f" over {facts['sessions']} sessions" if (facts.get("sessions") or 1) > 1 else "")),
            ("evaluations/s", _fmt(facts["evals_per_s"])),
            ("worker utilization", _fmt(facts["utilization"], 3)
             + (f" ({facts['replacements']} worker replacements)" if facts.get("replacements") else ""))]
    per = facts.get("time_per_candidate")
    if per:
        labels = (("merge_s", "merge"), ("transfer_s", "transfer (within the merge)"), ("score_s", "score"))
        parts = [f"{label} {per[k]:.4g} s" for k, label in labels if per.get(k) is not None]
        rows.append(("time per candidate", ", ".join(parts) + f" (mean of {per.get('candidates', '?')} evaluated)"))
    best = "-" if facts["best_fitness"] is None else f"{facts['best_fitness']:.6g} (eval {facts['best_id']})"
    rows.append(("best fitness", best))
    hold = facts.get("holdout")
    if isinstance(hold, dict) and hold:
        rows.append(("held-out (best)", ", ".join(f"{k} {_fmt(v)}" for k, v in hold.items())))
    lines = [f"# Run report: {run.name}", "", _table(rows), ""]
    if notes:
        lines += ["Notes:", ""] + [f"- {n}" for n in notes] + [""]
    for file, caption in images:
        lines += [f"![{file}]({file})", "", f"*{file}: {caption}*", ""]
    path.write_text("\n".join(lines))


# writing ---------------------------------------------------------------------------------------
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


def report_run(run: Run) -> tuple[Path, dict]:
    """Write RUN_DIR/report/; returns its path and the seconds spent per part."""
    timing = {}
    notes: list[str] = []
    images: list[tuple[str, str]] = []
    dest = run.path / "report"
    with _Staged(dest) as out:
        t0 = time.perf_counter()
        facts = _facts(run)
        if run.summary is None:
            notes.append("no summary.json (the run is still going, or was killed): figures come from the records")
        if run.torn:
            notes.append("the last line of evals.jsonl is incomplete (being written, or the driver was killed)")
        missing_t = int(np.isnan(run.t).sum())
        if not run.has_t:
            notes.append("the records have no time stamp `t` (logged by an older version): no plots over search time")
        elif missing_t:
            notes.append(f"{missing_t} of {run.n} records have no time stamp `t` (logged by an older version): "
                         "the plots over time show the others")

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
            images.append(("strategy.png", f"{run.strategy}'s statistics over evaluations, from strategy.jsonl"))
        elif run.stats:
            notes.append(f"strategy.jsonl holds no statistics ({run.strategy} reports none): no strategy.png")
        else:
            notes.append("no strategy.jsonl (a run of an older version): no strategy.png")
        if run.strategy == "m2n2":
            archive = read_archive(run)
            if archive is not None:
                cov = plot_archive(run, archive, out / "archive.png")
                images.append(("archive.png", f"the final archive's per-example scores, members (best first) x "
                                              f"examples (most solved first); coverage {cov:.3f}"))
            else:
                notes.append("no scored archive in checkpoint.pkl: no archive.png")
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
                           + _split_caption(run)))
        timing["plot_s"] = time.perf_counter() - t0
        write_markdown(run, facts, images, notes, out / "report.md")
    return dest, timing


def report_compare(runs: list[Run], labels: list[str], dest: Path) -> Path:
    with _Staged(dest) as out:
        plot_overlay(runs, labels, out / "best.png")
        head = ["| run | strategy | best fitness | evaluations | failed | search time (s) | evaluations/s | report |",
                "| --- | --- | --- | --- | --- | --- | --- | --- |"]
        rows = []
        for run, label in zip(runs, labels):
            f = _facts(run)
            rel = os.path.relpath(run.path / "report" / "report.md", dest)
            rows.append(f"| {label} | {run.strategy} | {_fmt(f['best_fitness'], 6)} | {f['evaluations']} | "
                        f"{f['failed']} | {_fmt(f['seconds'])} | {_fmt(f['evals_per_s'])} | [{rel}]({rel}) |")
        text = ["# Comparison of runs", "", *head, *rows, "",
                "![best.png](best.png)", "",
                "*best.png: each run's best fitness so far, vs evaluations"
                + (" and vs search time" if any(r.has_t for r in runs) else "") + "*", ""]
        (out / "report.md").write_text("\n".join(text))
    return dest


def report_main(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    if args.label and len(args.label) != len(args.runs):
        raise UserError(f"--label: give one per run ({len(args.runs)} runs, {len(args.label)} labels)")
    if args.out and len(args.runs) < 2:
        raise UserError("--out: the comparison needs two or more runs (one run's report goes to RUN_DIR/report)")
    for p in args.runs:  # every path checked before anything is written
        if not Path(p).is_dir() or not _is_run(Path(p)):
            raise UserError(f"report {p}: not a run directory (config.yaml and evals.jsonl expected)")
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
