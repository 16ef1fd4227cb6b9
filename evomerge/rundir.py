"""The run directory: config.yaml, evals.jsonl (append-only), summary.json, best/."""
from __future__ import annotations

import json
import os
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
        run._evals = open(run.path / "evals.jsonl", "a", buffering=1 << 16)
        return run

    def log_evals(self, records: list[dict]) -> None:
        self._evals.write("".join(json.dumps(r, separators=(",", ":")) + "\n" for r in records))

    def flush(self) -> None:
        if self._evals:
            self._evals.flush()

    def write_summary(self, summary: dict) -> None:
        write_atomic(self.path / "summary.json", json.dumps(summary, indent=2) + "\n")

    def close(self) -> None:
        if self._evals:
            self._evals.close()
            self._evals = None
