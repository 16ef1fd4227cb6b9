"""workers.png: each worker's busy intervals over search time, replacements, the utilization of all
workers, and each worker's mean seconds per candidate split into merge, scoring and the rest."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from .figure import figure, save
from .read import Run


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
    fig = figure(10, 2.6 + 0.35 * min(workers, 32) + 2.4 + (rows + 1.0 if split else 0.0))
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
    save(fig, path)
    return mean


def split_caption(run: Run) -> str:
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
