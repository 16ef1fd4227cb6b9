"""A run's state on disk: an atomic checkpoint plus a write-ahead journal of what happened since (the
format; their files are named and opened by `evomerge.rundir`).

The checkpoint (``checkpoint.pkl``, written to a temporary file, fsynced, then renamed) holds the
strategy's state, the engine's state (candidates asked and not yet told, counters, best so far) and
the evaluation cache. Between checkpoints every strategy call is appended to the journal named by the
checkpoint: ``("ask", n, first_id, keys)`` and ``("tell", [(record, packed scores), ...])``. A strategy is
a deterministic function of its calls, so replaying the journal on top of the checkpoint rebuilds the
exact state of the moment the driver died, and nothing already evaluated runs or is logged again.
"""
from __future__ import annotations

import os
import pickle
import struct
from pathlib import Path

import numpy as np

from .errors import UserError

_LEN = struct.Struct("<Q")


def pack_scores(s: np.ndarray | None):
    """Per-example scores, compact and exact: bits when all are 0/1, float32 when lossless."""
    if s is None:
        return None
    s = np.asarray(s).reshape(-1)
    if s.dtype != np.bool_ and np.all((s == 0) | (s == 1)):
        return ("bits", s.size, np.packbits(s.astype(np.uint8)).tobytes())
    if s.dtype == np.float64 and np.array_equal(s.astype(np.float32).astype(np.float64), s):
        return ("f32", s.size, s.astype(np.float32).tobytes())
    return ("raw", str(s.dtype), s.tobytes())


def unpack_scores(p) -> np.ndarray | None:
    if p is None:
        return None
    kind, meta, data = p
    if kind == "bits":
        return np.unpackbits(np.frombuffer(data, np.uint8))[:meta].astype(np.float64)
    if kind == "f32":
        return np.frombuffer(data, np.float32).astype(np.float64)
    return np.frombuffer(data, np.dtype(meta)).copy()


class Journal:
    """Append-only length-prefixed pickles; each append reaches the OS before it returns."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self._f = open(self.path, "ab")

    def append(self, op: tuple) -> None:
        data = pickle.dumps(op, protocol=pickle.HIGHEST_PROTOCOL)
        self._f.write(_LEN.pack(len(data)) + data)
        self._f.flush()

    def close(self) -> None:
        self._f.close()

    @staticmethod
    def read(path: Path) -> list[tuple]:
        """Every complete entry; a torn last entry (the driver died while writing it) is cut off."""
        path = Path(path)
        if not path.exists():
            return []
        data = path.read_bytes()
        ops, pos = [], 0
        while pos + _LEN.size <= len(data):
            (n,) = _LEN.unpack_from(data, pos)
            if pos + _LEN.size + n > len(data):
                break
            try:
                ops.append(pickle.loads(data[pos + _LEN.size:pos + _LEN.size + n]))
            except Exception:  # noqa: BLE001 - a torn entry
                break
            pos += _LEN.size + n
        if pos < len(data):
            with open(path, "r+b") as f:
                f.truncate(pos)
        return ops


def write_checkpoint(path: Path, state: dict) -> None:
    """The checkpoint `state` as file `path`, replaced atomically (fsynced before the rename)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        pickle.dump(state, f, protocol=pickle.HIGHEST_PROTOCOL)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


CHECKPOINT_KEYS = ("version", "journal_no", "strategy", "engine")


def read_checkpoint(path: Path, flag: str = "--resume") -> dict:
    """The checkpoint in file `path`; a UserError naming the file when it is missing, empty, truncated or
    not a checkpoint of this version."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            state = pickle.load(f)
    except OSError as e:
        raise UserError(f"{flag}: {path}: cannot read: {e.strerror}") from None
    except Exception as e:  # noqa: BLE001 - unpickling garbage raises anything
        why = "empty" if path.stat().st_size == 0 else f"{type(e).__name__}"
        raise UserError(f"{flag}: {path} is damaged ({why}); the run cannot be resumed from it") from None
    if not isinstance(state, dict) or any(k not in state for k in CHECKPOINT_KEYS) or state["version"] != 1:
        raise UserError(f"{flag}: {path} is not a checkpoint of this version of evomerge")
    return state
