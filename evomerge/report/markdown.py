"""report.md: the facts of a run (summary.json's figures, else from the records) as a table, the
notes, and each plot with its caption; and the comparison of several runs."""
from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np

from ..rundir import REPORT, SUMMARY
from .read import Run


def fmt(v, digits: int = 4) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        if not math.isfinite(v):
            return str(v)
        return f"{v:.{digits}g}" if abs(v) < 1e5 else f"{v:.3e}"
    return str(v)


def run_facts(run: Run) -> dict:
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
        "stop_reason": s.get("stop_reason", f"- (no {SUMMARY}: running, or killed)"),
        "seconds": seconds, "evals_per_s": evals_per_s, "sessions": s.get("sessions"),
        "utilization": s.get("worker_utilization"), "replacements": s.get("worker_replacements"),
        "best_fitness": best.get("fitness", float(run.fitness[best_i]) if best_i >= 0 else None),
        "best_id": best.get("eval_id", int(run.ids[best_i]) if best_i >= 0 else None),
        "holdout": best.get("holdout"),
        "best_scored_on": best.get("scored_on"),
        "scoring": s.get("scoring"),
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
            ("evaluations/s", fmt(facts["evals_per_s"])),
            ("worker utilization", fmt(facts["utilization"], 3)
             + (f" ({facts['replacements']} worker replacements)" if facts.get("replacements") else ""))]
    per = facts.get("time_per_candidate")
    if per:
        labels = (("merge_s", "merge"), ("transfer_s", "transfer (within the merge)"), ("score_s", "score"))
        parts = [f"{label} {per[k]:.4g} s" for k, label in labels if per.get(k) is not None]
        rows.append(("time per candidate", ", ".join(parts) + f" (mean of {per.get('candidates', '?')} evaluated)"))
    best = "-" if facts["best_fitness"] is None else f"{facts['best_fitness']:.6g} (eval {facts['best_id']})"
    sc = facts.get("scoring")
    if sc:  # scored on subsets / raced: the told fitnesses are estimates; the best is a full score
        best += f", scored on {facts.get('best_scored_on') or 'all examples'}"
        rows.append(("examples scored", f"{sc['examples_scored']} of {sc['examples_if_all_scored']} if every "
                     f"candidate were scored on all {sc['examples']} ({100 * sc['share_scored']:.1f}%); "
                     f"{sc['estimated']} estimates told (subset of {sc['subsample']}"
                     + (f", {sc['raced']} stopped by racing after {sc['race_first']}" if sc.get("race_first") else "")
                     + f"), {len(sc['verified'])} verified on every example"))
    rows.append(("best fitness", best))
    hold = facts.get("holdout")
    if isinstance(hold, dict) and hold:
        rows.append(("held-out (best)", ", ".join(f"{k} {fmt(v)}" for k, v in hold.items())))
    lines = [f"# Run report: {run.name}", "", _table(rows), ""]
    if notes:
        lines += ["Notes:", ""] + [f"- {n}" for n in notes] + [""]
    for file, caption in images:
        lines += [f"![{file}]({file})", "", f"*{file}: {caption}*", ""]
    path.write_text("\n".join(lines))


def write_compare(runs: list[Run], labels: list[str], dest: Path, path: Path) -> None:
    """The comparison's report.md (to be moved to directory `dest`): a row per run, linking its report."""
    head = ["| run | strategy | best fitness | evaluations | failed | search time (s) | evaluations/s | report |",
            "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    rows = []
    for run, label in zip(runs, labels):
        f = run_facts(run)
        rel = os.path.relpath(run.path / REPORT / "report.md", dest)
        rows.append(f"| {label} | {run.strategy} | {fmt(f['best_fitness'], 6)} | {f['evaluations']} | "
                    f"{f['failed']} | {fmt(f['seconds'])} | {fmt(f['evals_per_s'])} | [{rel}]({rel}) |")
    text = ["# Comparison of runs", "", *head, *rows, "",
            "![best.png](best.png)", "",
            "*best.png: each run's best fitness so far, vs evaluations"
            + (" and vs search time" if any(r.has_t for r in runs) else "") + "*", ""]
    path.write_text("\n".join(text))
