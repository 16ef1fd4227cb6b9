"""The end of a session: summary.json's fields, and the best model written to best/."""
from __future__ import annotations

import os
import resource
import shutil

from ..rundir import RunDir
from .pool import CallFailed, WorkerLost, WorkerPool

NO_BEST = ("interrupted", "no_workers")  # stop reasons after which the workers are not asked for more


def summarize(engine, session_seconds: float, search_seconds: float, done_now: int, driver_cpu: float) -> dict:
    """summary.json of a session of `engine` (an Engine that has just stopped): counts, rates, the pool,
    the best (held-out metrics; its model saved to best/), the strategy's summary, peak memory."""
    e, ledger, pool = engine.cfg.engine, engine.ledger, engine.pool
    c = ledger.counts
    done = c["told"]
    summary = {
        "stop_reason": engine.stop_reason,
        "evaluations": done,
        "search_seconds": round(search_seconds, 3),
        "startup_seconds": round(pool.startup_seconds, 3),
        "evals_per_second": round(done_now / max(session_seconds, 1e-9), 2),
        "sessions": engine.sessions,
        "workers": pool.size,
        "workers_live": sum(pool.ready),  # at the end; the others were lost
        "workers_given_up": len(pool.given_up),  # could not start (e.g. no room left on the cluster)
        "worker_devices": [None if w is None else w.get("device") for w in pool.info],
        "batch_size": e.batch_size,
        "deterministic": e.deterministic,
        "worker_utilization": round(ledger.busy_seconds / max(pool.size * search_seconds, 1e-9), 4),
        "driver_cpu_ms_per_eval": round(1e3 * driver_cpu / max(done_now, 1), 4),
        "engine_overhead_ms_per_eval": round(
            1e3 * max(0.0, search_seconds - ledger.busy_seconds / pool.size) / max(done, 1), 4),
        "failed": c["failed"],
        "retried": c["retried"],
        "cached": c["cached"],
        "timeouts": c["timeouts"],
        "worker_replacements": c["worker_replacements"],
    }
    per_candidate = ledger.time_per_candidate()
    if per_candidate:
        summary["time_per_candidate"] = per_candidate
    if ledger.last_failure:
        summary["last_failure"] = ledger.last_failure
    if ledger.front is not None:
        summary["pareto_front"] = {"objectives": ledger.front.objectives, "members": ledger.front.sorted()}
    if ledger.plan is not None:
        summary["scoring"] = scoring_summary(ledger)
    if ledger.best["x"] is not None and engine.stop_reason not in NO_BEST:
        summary["best"] = save_best(pool, engine.rundir, ledger.best)
        if ledger.plan is not None:  # the best is always a score on every example (Engine.verify)
            summary["best"]["scored_on"] = "all examples"
    summary["strategy"] = engine.strategy.summary()
    summary["driver_peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    if engine.stop_reason not in NO_BEST:
        rss = pool.peak_rss_mb()
        if rss is not None:
            summary["worker_peak_rss_mb"] = [round(m, 1) for m in rss]
    return summary


def scoring_summary(ledger) -> dict:
    """What scoring on subsets and racing did: the examples scored, against every candidate on all of
    them; the estimates told (subsets, raced), and the verified estimates (their estimate, full score)."""
    plan, c = ledger.plan, ledger.counts
    full = c["told"] * plan.total
    out = {"examples": plan.total, "subsample": plan.k, "race_first": plan.m,
           "examples_scored": c["examples_scored"], "examples_if_all_scored": full,
           "share_scored": round(c["examples_scored"] / max(full, 1), 4),
           "estimated": c["estimated"], "raced": c["raced"]}
    out["verified"] = [{"eval_id": e["id"], "estimate": e["fitness"],
                        **({"fitness": v["fitness"]} if not v.get("failed") else {"error": v.get("error")})}
                       for e in ledger.estimates if (v := ledger.verified.get(e["id"])) is not None]
    return out


def save_best(pool: WorkerPool, rundir: RunDir, best: dict) -> dict:
    """Held-out metrics of the best, and the best model written to best/ (replaced atomically), by the
    first live worker that is still there."""
    live = pool.live()
    for w in live + live[:1]:
        try:
            try:
                holdout = pool.holdout(w, best["x"])
            except CallFailed as err:  # the held-out split could not be scored (e.g. the API budget is spent)
                cause = err.cause if err.cause is not None else err
                holdout = {"error": f"{type(cause).__name__}: {str(cause).strip().splitlines()[-1][:300]}"}
            info = {"eval_id": best["id"], "fitness": best["fitness"], **best["metrics"], **holdout}
            tmp = rundir.path / ".best.tmp"
            shutil.rmtree(tmp, ignore_errors=True)
            pool.save(w, best["x"], str(tmp.resolve()), info)
            break
        except WorkerLost:
            continue
    else:
        raise RuntimeError("no worker is left to save the best model")
    shutil.rmtree(rundir.best, ignore_errors=True)
    os.replace(tmp, rundir.best)
    return {"eval_id": best["id"], "fitness": best["fitness"], "metrics": best["metrics"], "holdout": holdout}
