"""The run directory: config.yaml, evals.jsonl (append-only), workers.jsonl (worker starts and
replacements), strategy.jsonl (the strategy's statistics over time), checkpoint.pkl + journal-N.bin
(resume), summary.json, best/, report/ (python run.py report)."""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

from .errors import UserError


def check_new(path: Path) -> None:
    """A run never writes into a directory that already holds something."""
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise UserError(f"--out {path}: already exists and is not empty; choose another name")


def write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


class RunDir:
    def __init__(self, path: Path):
        self.path = Path(path)
        self.best = self.path / "best"
        self._evals = None

    @classmethod
    def create(cls, path: Path, config_yaml: str) -> "RunDir":
        check_new(Path(path))
        run = cls(path)
        run.path.mkdir(parents=True, exist_ok=True)
        write_atomic(run.path / "config.yaml", config_yaml)
        run._open()
        return run

    @classmethod
    def open(cls, path: Path) -> "RunDir":
        """An existing run directory, to resume: evals.jsonl is appended to."""
        run = cls(path)
        if not (run.path / "config.yaml").is_file() or not (run.path / "checkpoint.pkl").is_file():
            raise UserError(f"--resume {path}: not a run directory with a checkpoint "
                            "(config.yaml and checkpoint.pkl expected)")
        run._open()
        return run

    def _open(self) -> None:
        self._evals = open(self.path / "evals.jsonl", "a", buffering=1 << 16)
        self._events = open(self.path / "workers.jsonl", "a", buffering=1)
        self._stats = open(self.path / "strategy.jsonl", "a", buffering=1)

    def log_event(self, event: dict) -> None:
        self._events.write(json.dumps({"time": round(time.time(), 3), **event}) + "\n")

    def log_evals(self, records: list[dict]) -> None:
        """Append and hand to the OS at once: a killed driver loses no logged evaluation."""
        self._evals.write("".join(json.dumps(r, separators=(",", ":")) + "\n" for r in records))
        self._evals.flush()

    def log_stats(self, entry: dict) -> None:
        """One line of strategy statistics (line-buffered: each reaches the OS as it is written)."""
        self._stats.write(json.dumps(entry, separators=(",", ":")) + "\n")

    def flush(self) -> None:
        if self._evals:
            self._evals.flush()

    def write_config(self, config_yaml: str) -> None:
        write_atomic(self.path / "config.yaml", config_yaml)

    def write_summary(self, summary: dict) -> None:
        write_atomic(self.path / "summary.json", json.dumps(summary, indent=2) + "\n")

    def close(self) -> None:
        if self._evals:
            self._evals.close()
            self._events.close()
            self._stats.close()
            self._evals = None
