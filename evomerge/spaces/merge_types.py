"""What the merge spaces (`hf_merge`, `hf_mixture`, `api_weights`) share: a searched range, the seed
models and how they are found and opened, the cache keys of what is computed once per model set, and the
base of the spaces whose points become a resident model. No torch at import time (`weights.py`, which
maps the checkpoints, is imported when a space opens its models).
"""
from __future__ import annotations

import hashlib
import json
from abc import abstractmethod
from pathlib import Path
from typing import Iterable

import numpy as np
from pydantic import Field, model_validator

from ..errors import UserError
from ..schema import Frozen
from .base import SearchSpace


class Range(Frozen):
    """A searched interval: the strategy's bounds for this parameter."""

    low: float = Field(description="lower bound (inclusive)")
    high: float = Field(description="upper bound (inclusive; equal to low fixes the value)")

    @model_validator(mode="after")
    def _ordered(self):
        if self.low > self.high:
            raise ValueError(f"low {self.low} is above high {self.high}")
        return self


class Models(Frozen):
    """The seed checkpoints: a base and labelled experts (full checkpoints or LoRA adapters of the base)."""

    base: str = Field(description="base model: a local directory or a hub id")
    experts: dict[str, str] = Field(description="label -> fine-tuned model (local directory or hub id)")

    @model_validator(mode="after")
    def _some(self):
        if not self.experts:
            raise ValueError("name at least one expert")
        return self


def resolve_model(ref: str, what: str) -> Path:
    """A local directory (a finished run's directory: its best/ model), or a hub id resolved through the
    local hub cache / a download."""
    p = Path(ref).expanduser()
    if p.is_dir():
        from ..rundir import BEST, CONFIG

        if not (p / "config.json").exists() and (p / CONFIG).exists():  # a run directory: its best model
            if not (p / BEST / "config.json").exists():
                raise UserError(f"space.models.{what}: {ref}: a run directory with no {BEST}/ model yet "
                                "(the run has not finished a session)")
            return p / BEST
        return p
    if p.exists() or ref.startswith((".", "/", "~")):
        raise UserError(f"space.models.{what}: {ref}: not a model directory")
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(ref, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt"]))
    except Exception as e:  # noqa: BLE001 - any hub failure is the user's model reference
        hint = ""
        if ref.startswith("zoo/"):
            from ..command import prog

            name = ref.split("/")[1]
            hint = f"; build the demo models first: {prog('zoo')} {name} --out zoo/{name}"
        raise UserError(f"space.models.{what}: {ref}: not a local directory and not loadable from the hub "
                        f"({type(e).__name__}){hint}") from None


def resolve_models(models: Models) -> tuple[Path, dict[str, Path]]:
    """(the base's directory, label -> each expert's directory)."""
    return (resolve_model(models.base, "base"),
            {k: resolve_model(v, f"experts.{k}") for k, v in models.experts.items()})


def cache_root(cache_dir: str | None) -> Path:
    """Where what is computed once per model set is stored: space.cache_dir, or ~/.cache/evomerge/task_vectors."""
    return Path(cache_dir or Path.home() / ".cache" / "evomerge" / "task_vectors")


def files_key(prefix: str, files: Iterable[Path]) -> str:
    """16 hex digits naming `prefix` over these files as they are now (path, size, modification time)."""
    key = hashlib.sha256(prefix.encode())
    for f in files:
        st = f.stat()
        key.update(f"{f.resolve()}:{st.st_size}:{st.st_mtime_ns}".encode())
    return key.hexdigest()[:16]


class CheckpointSpace(SearchSpace):
    """A space over the checkpoints of `cfg.models`: the base and the experts memory-mapped
    (`weights.Checkpoint`, LoRA experts as `weights.Adapter`) and checked against each other; a point is
    a recipe (`decode`), which a worker's runtime (`open_runtime`, once per process) merges into its
    resident model."""

    runtime = None  # the runtime.ResidentModel, once opened

    def open_models(self, models: Models) -> None:
        """Find and open the base and the experts: base_path, expert_paths, base, experts."""
        from ..weights import Checkpoint, check_compatible, open_expert

        self.base_path, self.expert_paths = resolve_models(models)
        self.base = Checkpoint.open(self.base_path)
        self.experts = {k: open_expert(p, self.base) for k, p in self.expert_paths.items()}
        check_compatible(self.base, self.experts)

    @abstractmethod
    def new_runtime(self, device: str):
        """This space's runtime (a `runtime.ResidentModel`) on `device` (auto, cpu, cuda)."""

    def open_runtime(self, device: str | None = None):
        """The process's runtime, opened on first use on `device` (default: space.device)."""
        if self.runtime is None:
            self.runtime = self.new_runtime(device or self.cfg.device)
        return self.runtime

    def recipe(self, x: np.ndarray) -> dict:
        return self.decode(x)

    def save(self, x: np.ndarray, directory: Path, info: dict) -> None:
        """Point x as a model directory, with recipe.json and info.json beside it."""
        rt = self.open_runtime()
        recipe = self.decode(x)
        rt.materialize(recipe)
        rt.save(directory)
        (Path(directory) / "recipe.json").write_text(json.dumps(recipe, indent=2) + "\n")
        (Path(directory) / "info.json").write_text(json.dumps(info, indent=2) + "\n")
