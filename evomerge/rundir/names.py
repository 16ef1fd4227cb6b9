"""The names of a run directory's files: the one place they are spelled (every module reads and writes a
run directory through `evomerge.rundir`)."""
from __future__ import annotations

CONFIG = "config.yaml"  # the resolved config
EVALS = "evals.jsonl"  # one record per evaluation, append-only
EVENTS = "workers.jsonl"  # worker starts and replacements
SUBSETS = "subsets.jsonl"  # the example index sets evals.jsonl's records name by "draw" (scoring on subsets)
STATS = "strategy.jsonl"  # the strategy's statistics over time
SUMMARY = "summary.json"  # written at the end of a session
CHECKPOINT = "checkpoint.pkl"  # strategy and engine state (see journal.py)
BEST = "best"  # the best model's directory
REPORT = "report"  # the `report` command's directory
LOCK = ".lock"  # the writer's lock, holding its pid

# The timing fields of an evaluation record in evals.jsonl: seconds measured in the worker (see
# FitnessWorker.evaluate), on the records of candidates evaluated (not cached, not failed): merge_s
# materializing the model, score_s the fitness, transfer_s the host-to-device copies of streamed merge
# inputs (overlapping the merge: part of merge_s, not added to it).
TIMING_KEYS = ("merge_s", "transfer_s", "score_s")


def journal_name(n: int) -> str:
    """The journal of the calls since checkpoint number n."""
    return f"journal-{n:06d}.bin"
