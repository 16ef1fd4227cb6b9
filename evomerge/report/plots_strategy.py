"""The plots of the strategy's state: its statistics over evaluations (strategy.png, from
strategy.jsonl) and its final archive (archive.png, as the strategy's archive_view shows it)."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from ..rundir import STATS
from .figure import figure, save
from .read import Run


MAX_STATS = 12  # strategy.png: at most this many panels


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
    fig = figure(4.2 * ncol, 2.8 * nrow + 0.4, left=0.7, top=0.75, hspace=0.55, wspace=0.3)
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
    fig.suptitle(f"{run.name}: {run.strategy} statistics ({STATS})", fontsize=10)
    save(fig, path)


def plot_archive(run: Run, archive: dict, path: Path) -> float:
    """Heatmap of the final archive; returns its coverage (mean over examples of the best score)."""
    scores, fit = archive["scores"], archive["fitness"]
    rows = np.argsort(-fit, kind="stable")
    solvers = scores.sum(axis=0)
    cols = np.argsort(-solvers, kind="stable")
    s = scores[rows][:, cols]
    coverage = float(scores.max(axis=0).mean())
    m, e = s.shape
    fig = figure(10, 6, left=0.9, right=1.0, hspace=0.08)
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
    save(fig, path)
    return coverage
