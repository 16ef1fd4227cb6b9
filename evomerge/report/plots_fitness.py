"""The plots of fitness: every evaluation's fitness and the best so far (fitness.png), the per-task
metrics of the best so far (tasks.png), and several runs' best so far overlaid (best.png)."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from .figure import POINTS_MAX, figure, save
from .read import Run


MAX_METRICS = 12  # tasks.png: at most this many metrics


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
    fig = figure(10, 3.6 * len(panels))
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
    save(fig, path)


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
    fig = figure(10, 4.5)
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
    save(fig, path)


def plot_overlay(runs: list[Run], labels: list[str], path: Path) -> None:
    any_t = any(r.has_t for r in runs)
    fig = figure(10, 3.8 * (2 if any_t else 1))
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
    save(fig, path)
