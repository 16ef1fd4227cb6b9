"""pareto.png: every evaluation over the fitness's objectives, the Pareto front highlighted (the mask
of evomerge.pareto)."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from ..pareto import pareto_mask
from .figure import POINTS_MAX, figure, save
from .read import Run


MAX_PARETO = 5  # pareto.png: a scatter matrix over at most this many objectives


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
        fig = figure(7, 6, left=0.9)
        axes = np.array([[fig.subplots()]])
        pairs = [(0, 0, 0, 1)]
    else:
        side = max(3.0, 7.0 / (k - 1))
        fig = figure(side * (k - 1), side * (k - 1), left=0.9, top=0.55, hspace=0.4, wspace=0.4)
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
    save(fig, path)
    return len(front)
