"""The reader of a run directory: what `report`, `export`, `serve`, the Pareto front and `--resume` read of
one, finished, interrupted or still being written (a torn last line of a log is skipped, never fatal)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator

from ..errors import UserError
from .names import CHECKPOINT, CONFIG, EVALS, SUMMARY


def is_run_dir(path: str | Path) -> bool:
    """A directory with a config.yaml and an evals.jsonl (a run that has started)."""
    path = Path(path)
    return (path / CONFIG).is_file() and (path / EVALS).is_file()


def config_file(path: str | Path, flag: str) -> Path:
    """The config.yaml of run directory `path` (to load as a RunConfig); a UserError `<flag>: not a run
    directory (no config.yaml)` when there is none."""
    file = Path(path) / CONFIG
    if not file.exists():
        raise UserError(f"{flag}: not a run directory (no {CONFIG})")
    return file


def read_config(path: str | Path) -> dict:
    """The sections of config.yaml as a plain dict, read leniently: {} when it is missing, not YAML or not
    a mapping (an old or foreign run still reports)."""
    import yaml

    try:
        config = yaml.safe_load((Path(path) / CONFIG).read_text()) or {}
    except (OSError, yaml.YAMLError):
        return {}
    return config if isinstance(config, dict) else {}


def read_summary(path: str | Path) -> dict | None:
    """summary.json; None when it is absent (a run still going, or killed) or unreadable."""
    file = Path(path) / SUMMARY
    if not file.is_file():
        return None
    try:
        return json.loads(file.read_text())
    except (OSError, ValueError):
        return None


class EvalRecords:
    """The records of evals.jsonl of run directory `path`, streamed in file order (iterate; each pass
    reads the file again). A non-empty line that is not JSON (a torn last line: the run is being written,
    or its driver was killed) is skipped; `torn` says whether the last pass met one."""

    def __init__(self, path: str | Path):
        self.file = Path(path) / EVALS
        self.torn = False

    def __iter__(self) -> Iterator[dict]:
        self.torn = False
        loads = json.loads
        with open(self.file, "rb") as f:
            for line in f:
                try:
                    rec = loads(line)
                except ValueError:
                    if line.strip():
                        self.torn = True
                    continue
                yield rec


def iter_evals(path: str | Path) -> Iterator[dict]:
    """The records of evals.jsonl in file order, streamed (see EvalRecords)."""
    return iter(EvalRecords(path))


def find_eval(path: str | Path, eval_id: int) -> dict | None:
    """The record of evaluation `eval_id` in evals.jsonl; None when there is none."""
    return next((rec for rec in iter_evals(path) if rec["id"] == eval_id), None)


def find_recipe(path: str | Path, eval_id: int | None) -> tuple[int, dict]:
    """The recipe of evaluation `eval_id` (default: the run's best, from summary.json) from evals.jsonl;
    a UserError when there is no summary to name the best, no such evaluation, or it has no recipe."""
    path = Path(path)
    if eval_id is None:
        summary = read_summary(path)
        if summary is None:
            raise UserError(f"{path}: no {SUMMARY} (an unfinished run?): pass --eval-id")
        eval_id = summary["best"]["eval_id"]
    rec = find_eval(path, eval_id)
    if rec is None:
        raise UserError(f"--eval-id {eval_id}: no such evaluation in {path / EVALS}")
    if "recipe" not in rec:
        raise UserError(f"{path}: evaluation {eval_id} has no recipe (its space is a dense parameter vector; "
                        "the best model is in best/)")
    return eval_id, rec["recipe"]


def read_jsonl(path: str | Path, name: str) -> list[dict]:
    """Every JSON line of log `name` (strategy.jsonl, workers.jsonl) of run directory `path`; [] when it is
    absent (a run of an older version); lines that are not JSON are skipped."""
    file = Path(path) / name
    out = []
    if file.is_file():
        with open(file, "rb") as f:
            for line in f:
                try:
                    out.append(json.loads(line))
                except ValueError:
                    continue
    return out


def read_checkpoint(path: str | Path, flag: str = "--resume", max_bytes: int | None = None) -> dict:
    """checkpoint.pkl of run directory `path`, checked (journal.read_checkpoint): a UserError naming the
    file when it is missing, damaged, not a checkpoint of this version, or larger than `max_bytes`."""
    from ..journal import read_checkpoint as read

    file = Path(path) / CHECKPOINT
    if max_bytes is not None and file.is_file() and file.stat().st_size > max_bytes:
        raise UserError(f"{flag}: {file} is larger than {max_bytes >> 20} MiB: not read")
    return read(file, flag)
