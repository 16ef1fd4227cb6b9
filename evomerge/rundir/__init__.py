"""The run directory: config.yaml, evals.jsonl (append-only), workers.jsonl (worker starts and
replacements), strategy.jsonl (the strategy's statistics over time), checkpoint.pkl + journal-N.bin
(resume), summary.json, best/, report/ (`report` command), .lock (the writer's lock).

Every module reads and writes a run directory through this package: `RunDir` writes one (writer.py),
the functions of reader.py read one, and names.py spells its file names.
"""
from __future__ import annotations

from .names import (BEST, CHECKPOINT, CONFIG, EVALS, EVENTS, LOCK, REPORT, STATS, SUMMARY, TIMING_KEYS,
                    journal_name)
from .reader import (EvalRecords, config_file, find_eval, find_recipe, is_run_dir, iter_evals, read_checkpoint,
                     read_config, read_jsonl, read_summary)
from .writer import RunDir, dumps

__all__ = ["BEST", "CHECKPOINT", "CONFIG", "EVALS", "EVENTS", "LOCK", "REPORT", "STATS", "SUMMARY", "TIMING_KEYS",
           "EvalRecords",
           "RunDir", "config_file", "dumps", "find_eval", "find_recipe", "is_run_dir", "iter_evals", "journal_name",
           "read_checkpoint", "read_config", "read_jsonl", "read_summary"]
