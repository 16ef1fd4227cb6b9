"""The writer of a run directory: `RunDir` (the lock, config.yaml, the logs, summary.json, the checkpoint
and its journal) and the strict JSON every log line is written in.

One process writes a run directory: it holds an OS lock on ``.lock`` (flock, released when the process
dies, so a SIGKILLed driver leaves no stale lock) from before Ray starts until it exits. A new run
claims its directory before start-up and removes it again if it stops before the first write.
"""
from __future__ import annotations

import fcntl
import json
import math
import os
import shutil
import time
from pathlib import Path

from ..errors import UserError
from .names import BEST, CHECKPOINT, CONFIG, EVALS, EVENTS, LOCK, STATS, SUBSETS, SUMMARY, journal_name
from .reader import read_checkpoint

MIN_FREE_BYTES = 16 << 20  # --out on a file system with less free space is refused before start-up


def check_new(path: Path) -> None:
    """A run never writes into a directory that already holds something."""
    if path.exists() and (not path.is_dir() or any(p.name != LOCK for p in path.iterdir())):
        raise UserError(f"--out {path}: already exists and is not empty; choose another name")


def write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def finite(obj):
    """`obj` with every non-finite float replaced by None, and the places replaced (JSON has no NaN)."""
    where: dict[str, str] = {}

    def walk(v, path):
        if isinstance(v, float) and not math.isfinite(v):
            where[path] = str(v)
            return None
        if isinstance(v, dict):
            return {k: walk(x, f"{path}.{k}" if path else str(k)) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [walk(x, f"{path}[{i}]") for i, x in enumerate(v)]
        return v

    return walk(obj, ""), where


def dumps(record: dict, **kw) -> str:
    """JSON of a record; non-finite numbers are written as null, and `nonfinite` says which they were."""
    try:
        return json.dumps(record, allow_nan=False, **kw)
    except ValueError:
        clean, where = finite(record)
        clean["nonfinite"] = where
        return json.dumps(clean, allow_nan=False, **kw)


def _take_lock(path: Path, flag: str):
    """The writer's lock of run directory `path`, with this process's pid in it; UserError naming the
    holder when another process has it."""
    try:
        f = open(path / LOCK, "a+")
    except OSError as e:
        raise UserError(f"{flag} {path}: cannot write there: {e.strerror}") from None
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        f.seek(0)
        holder = f.read().strip() or "unknown"
        f.close()
        raise UserError(f"{flag} {path}: in use by another evomerge process (pid {holder}); wait for it to "
                        "finish or stop it") from None
    try:
        f.seek(0)
        f.truncate()
        f.write(f"{os.getpid()}\n")
        f.flush()
    except OSError as e:
        f.close()
        raise UserError(f"{flag} {path}: cannot write there: {e.strerror}") from None
    return f


def read_logged_ids(path: Path, flag: str) -> set[int]:
    """The ids in evals.jsonl, checked line by line without changing the file. A torn last line (no
    newline: the driver died while writing it) does not count; any other bad line is a UserError."""
    data = path.read_bytes()
    end = data.rfind(b"\n") + 1
    ids = set()
    for no, line in enumerate(data[:end].splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
            ok = isinstance(rec, dict) and type(rec.get("id")) is int
        except ValueError:
            ok = False
        if not ok:
            raise UserError(f"{flag}: {path} line {no} is damaged (not an evaluation record); the run cannot "
                            "be resumed (restore the file, or start a new run)")
        ids.add(rec["id"])
    return ids


class RunDir:
    """A run directory held by this process (see the module's docstring). `claim` a new one before
    start-up and `start` it when the run begins, or `open` an existing one to resume; `close` at the end
    (it removes a claimed directory that was never started)."""

    def __init__(self, path: Path, lock, created: bool = False):
        self.path = Path(path)
        self.best = self.path / BEST  # the best model's directory
        self.config_file = self.path / CONFIG  # the resolved config (written by start)
        self._lock = lock
        self._created = created  # made by claim(): removed again if the run never starts
        self._evals = None
        self.started = False
        self.checkpoint: dict | None = None  # resume: the checkpoint, read once (open)
        self.logged_ids: set[int] = set()  # resume: the ids evals.jsonl holds

    @classmethod
    def claim(cls, path: Path) -> "RunDir":
        """A new run directory, created and locked before anything starts (nothing else written yet)."""
        path = Path(path)
        check_new(path)
        created = not path.exists()
        try:
            path.mkdir(parents=True, exist_ok=True)
            free = shutil.disk_usage(path).free
        except OSError as e:
            raise UserError(f"--out {path}: cannot create it: {e.strerror}") from None
        if free < MIN_FREE_BYTES:
            if created:
                _remove_claimed(path)
            raise UserError(f"--out {path}: no space left on its file system ({free >> 20} MiB free)")
        try:
            lock = _take_lock(path, "--out")
        except UserError:
            if created and not (path / LOCK).exists():
                _remove_claimed(path)
            raise
        run = cls(path, lock, created)
        try:
            check_new(path)  # a run that claimed it just before us has started writing
        except UserError:
            run.close()
            raise
        return run

    def start(self, config_yaml: str) -> None:
        """The run begins: config.yaml and the logs are written from now on."""
        write_atomic(self.config_file, config_yaml)
        self._open()
        self.started = True

    @classmethod
    def open(cls, path: Path) -> "RunDir":
        """An existing run directory, to resume, locked and checked before anything starts: the
        checkpoint loads, evals.jsonl holds every evaluation it counts. Nothing is changed on a refusal."""
        path = Path(path)
        flag = f"--resume {path}"
        if not (path / CONFIG).is_file() or not (path / CHECKPOINT).is_file():
            raise UserError(f"{flag}: not a run directory with a checkpoint (config.yaml and checkpoint.pkl "
                            "expected)")
        run = cls(path, _take_lock(path, "--resume"))
        try:
            run.checkpoint = read_checkpoint(path, flag)
            told = run.checkpoint["engine"]["counts"]["told"]
            evals = path / EVALS
            if not evals.is_file():
                if told:
                    raise UserError(f"{flag}: {evals} is missing ({told} evaluations were logged there); "
                                    "restore it to resume")
            else:
                run.logged_ids = read_logged_ids(evals, flag)
                if len(run.logged_ids) < told:
                    raise UserError(f"{flag}: {evals} holds {len(run.logged_ids)} evaluations, the checkpoint "
                                    f"counts {told}: the file was cut short; restore it to resume")
                _cut_torn_line(evals)
        except BaseException:
            run.close()
            raise
        run._open()
        run.started = True
        return run

    def _open(self) -> None:
        self._evals = open(self.path / EVALS, "a", buffering=1 << 16)
        self._events = open(self.path / EVENTS, "a", buffering=1)
        self._stats = open(self.path / STATS, "a", buffering=1)

    def log_event(self, event: dict) -> None:
        self._events.write(dumps({"time": round(time.time(), 3), **event}) + "\n")

    def log_evals(self, records: list[dict]) -> None:
        """Append and hand to the OS at once: a killed driver loses no logged evaluation."""
        self._evals.write("".join(dumps(r, separators=(",", ":")) + "\n" for r in records))
        self._evals.flush()

    def log_subsets(self, draws: dict[int, list[int]]) -> None:
        """Lines of subsets.jsonl, {"draw": id, "indices": [...]}, written before the records naming them
        (a line may repeat after a resume; it is the same)."""
        with open(self.path / SUBSETS, "a") as f:
            f.write("".join(dumps({"draw": d, "indices": ix}, separators=(",", ":")) + "\n"
                            for d, ix in draws.items()))
            f.flush()
            os.fsync(f.fileno())

    def log_stats(self, entry: dict) -> None:
        """One line of strategy statistics (line-buffered: each reaches the OS as it is written)."""
        self._stats.write(dumps(entry, separators=(",", ":")) + "\n")

    def flush(self) -> None:
        if self._evals:
            self._evals.flush()

    def write_config(self, config_yaml: str) -> None:
        write_atomic(self.config_file, config_yaml)

    def write_summary(self, summary: dict) -> None:
        write_atomic(self.path / SUMMARY, dumps(summary, indent=2) + "\n")

    # resume: the checkpoint and the journal of the calls since (see journal.py)
    def write_checkpoint(self, state: dict) -> None:
        """checkpoint.pkl, replaced atomically (fsynced before the rename)."""
        from ..journal import write_checkpoint

        write_checkpoint(self.path / CHECKPOINT, state)

    def open_journal(self, n: int):
        """Journal number n (the one checkpoint number n names), opened for appending."""
        from ..journal import Journal

        return Journal(self.path / journal_name(n))

    def read_journal(self, n: int) -> list[tuple]:
        """Every complete entry of journal number n (none when it does not exist)."""
        from ..journal import Journal

        return Journal.read(self.path / journal_name(n))

    def close(self) -> None:
        """Close the logs and release the lock; a claimed directory the run never started is removed."""
        if self._evals:
            self._evals.close()
            self._events.close()
            self._stats.close()
            self._evals = None
        if not self.started and self._created:
            _remove_claimed(self.path)
        if self._lock is not None:
            self._lock.close()
            self._lock = None


def _remove_claimed(path: Path) -> None:
    """Remove a directory claim() made, if nothing but the lock is in it."""
    try:
        (path / LOCK).unlink(missing_ok=True)
        path.rmdir()
    except OSError:
        pass


def _cut_torn_line(path: Path) -> None:
    """Cut a torn last line (no newline) off an append-only JSON-lines file."""
    with open(path, "r+b") as f:
        size = f.seek(0, os.SEEK_END)
        if size == 0:
            return
        f.seek(size - 1)
        if f.read(1) == b"\n":
            return
        f.seek(0)
        data = f.read()
        f.truncate(data.rfind(b"\n") + 1)
