"""The `hf_mixture` space: piecewise mixtures of whole checkpoints, for M2N2's coefficient form.

A point is one coefficient per seed model (the experts, optionally the base) for every cell of a
grid over the parameters: one cell per tensor (`chunk_size: 0`) or chunks of `chunk_size` elements
of each tensor. The model it stands for is, cell by cell, sum_s c_s * seed_s. Without mutation,
M2N2's split-point SLERP of two such mixtures is again one, so its archive holds segment lists
(O(segments x seeds) numbers) instead of model copies; the SLERP angle comes from per-cell Gram
matrices of the seeds, computed once per set of models (`prepare`, cached on disk next to the
task vectors) and handed to the strategy.

The recipe (what evals.jsonl logs) is run-length coded: segments of consecutive cells with the same
coefficients, each named by its first tensor and chunk. Workers keep one resident model and write
each candidate into its parameters in place, reading the seeds memory-mapped.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import Field

from ..errors import UserError
from ..runtime import ResidentModel
from ..schema import Frozen
from .merge_types import CheckpointSpace, Models, cache_root, files_key


class HFMixtureSpaceConfig(Frozen):
    """Per-cell mixtures of whole checkpoints (for M2N2 with form: coefficients)."""

    name: Literal["hf_mixture"]
    models: Models = Field(description="the base and the experts; the experts (and with include_base the base) "
                                       "are the seeds mixed")
    include_base: bool = Field(False, description="mix the base too (seeds: base + experts), not only the experts")
    chunk_size: int = Field(0, ge=0, description="grid cells: 0 = one per tensor, N = chunks of N elements of a tensor")
    dtype: Literal["float32", "bfloat16", "float16"] = Field("float32", description="dtype of the resident model")
    device: str = Field("auto", description="resident model device: auto (cuda when the worker has a GPU), cpu, cuda")
    cache_dir: str | None = Field(None, description="where the seeds' per-cell Gram matrices are stored once "
                                                    "(default ~/.cache/evomerge/task_vectors)")


class HFMixtureSpace(CheckpointSpace):
    def __init__(self, cfg: HFMixtureSpaceConfig, seed: int):
        from ..weights import is_float_dtype

        self.cfg = cfg
        self.seed = seed
        self.open_models(cfg.models)
        experts = self.experts
        self.labels = (["base"] if cfg.include_base else []) + list(experts)
        if cfg.include_base and "base" in experts:
            raise UserError("space.models.experts.base: the label 'base' is taken by include_base: true")
        self.seed_models = {**({"base": self.base} if cfg.include_base else {}), **experts}
        slices = self.base.slices()
        # the grid: floating-point tensors in checkpoint order, each cut into cells
        self.cells: list[tuple[str, int, int]] = []  # (tensor, first element, end element)
        for name in self.base.names():
            shape, dtype = slices[name]
            if not is_float_dtype(dtype):
                continue
            n = int(np.prod(shape)) if shape else 1
            step = cfg.chunk_size or n
            self.cells.extend((name, lo, min(lo + step, n)) for lo in range(0, n, step))
        self.tensor_cells: dict[str, list[int]] = {}
        for i, (name, _, _) in enumerate(self.cells):
            self.tensor_cells.setdefault(name, []).append(i)
        self.n_seeds = len(self.labels)
        self.dim = len(self.cells) * self.n_seeds
        self.gram: np.ndarray | None = None  # (cells, S, S), by prepare()
        self.runtime = None

    # the vector <-> recipe ------------------------------------------------------------------
    def coefficients(self, x: np.ndarray) -> np.ndarray:
        """(cells, S) coefficients of point x."""
        return np.asarray(x, np.float64).reshape(len(self.cells), self.n_seeds)

    def seeds(self) -> list[np.ndarray]:
        """Seed s is the model itself: coefficient 1 on s in every cell."""
        eye = np.eye(self.n_seeds, dtype=np.float32)
        return [np.tile(eye[s], len(self.cells)) for s in range(self.n_seeds)]

    def decode(self, x: np.ndarray) -> dict:
        c = self.coefficients(x)
        segments = []
        for i, row in enumerate(c):
            if i == 0 or np.any(row != c[i - 1]):
                name, lo, _ = self.cells[i]
                chunk = (lo // self.cfg.chunk_size) if self.cfg.chunk_size else 0
                segments.append([name, chunk, [round(float(v), 7) for v in row]])
        return {"method": "mixture", "models": self.labels, "chunk_size": self.cfg.chunk_size, "segments": segments}

    def cell_coefficients(self, recipe: dict) -> np.ndarray:
        """(cells, S) coefficients of a recipe (the inverse of decode)."""
        if recipe.get("method") != "mixture" or recipe.get("models") != self.labels:
            raise ValueError(f"not a mixture recipe over {self.labels}")
        index = {(name, (lo // self.cfg.chunk_size) if self.cfg.chunk_size else 0): i
                 for i, (name, lo, _) in enumerate(self.cells)}
        starts = [index[(name, chunk)] for name, chunk, _ in recipe["segments"]]
        rows = np.array([c for _, _, c in recipe["segments"]], np.float64)
        out = np.empty((len(self.cells), self.n_seeds))
        for k, (s, e) in enumerate(zip(starts, starts[1:] + [len(self.cells)])):
            out[s:e] = rows[k]
        return out

    def describe(self) -> dict:
        return {"dim": self.dim, "method": "mixture", "seeds": self.labels, "cells": len(self.cells),
                "tensors": len(self.tensor_cells), "chunk_size": self.cfg.chunk_size}

    # once per run: the seeds' Gram matrices per cell ----------------------------------------------
    def gram_path(self) -> Path:
        files = [f for ck in self.seed_models.values() for f in ck.source_files()]
        key = files_key(f"gram:{self.cfg.chunk_size}:{self.labels}", files)
        return cache_root(self.cfg.cache_dir) / f"gram-{key}.npy"

    def prepare(self) -> Path:
        """Compute (or load) <seed_i, seed_j> per cell in float64, streaming one tensor at a time."""
        import torch

        path = self.gram_path()
        if path.exists():
            self.gram = np.load(path)
            return path
        s = self.n_seeds
        gram = np.zeros((len(self.cells), s, s))
        for name, idx in self.tensor_cells.items():
            flat = []
            for label, ck in self.seed_models.items():
                t = ck.tensor(name).reshape(-1).double()
                if not torch.isfinite(t).all():
                    raise UserError(f"space.models.{'base' if label == 'base' else 'experts.' + label}: "
                                    f"tensor {name} contains NaN or Inf")
                flat.append(t)
            for i in idx:
                _, lo, hi = self.cells[i]
                block = torch.stack([f[lo:hi] for f in flat])
                gram[i] = (block @ block.T).numpy()
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp.npy")
        np.save(tmp, gram)
        os.replace(tmp, path)
        self.gram = gram
        return path

    # worker side ------------------------------------------------------------------------------
    def new_runtime(self, device: str) -> "MixtureRuntime":
        return MixtureRuntime(self, device)

    def mergekit_config(self, recipe: dict) -> dict:
        """One coefficient per tensor and seed is mergekit's `linear` without normalization."""
        if self.cfg.chunk_size and any(len(v) > 1 for v in self.tensor_cells.values()):
            raise UserError("--mergekit: chunks inside tensors (space.chunk_size) have no mergekit equivalent")
        c = self.cell_coefficients(recipe)
        paths = {"base": str(self.base_path), **{k: str(v) for k, v in self.expert_paths.items()}}
        models = []
        for s, label in enumerate(self.labels):
            values = [{"filter": name, "value": float(c[self.tensor_cells[name][0], s])} for name in self.tensor_cells]
            distinct = {v["value"] for v in values}
            models.append({"model": paths[label],
                           "parameters": {"weight": values[0]["value"] if len(distinct) == 1 else values}})
        return {"merge_method": "linear", "dtype": "float32", "parameters": {"normalize": False}, "models": models}


class MixtureRuntime(ResidentModel):
    """A worker's resident model; the seeds stay memory-mapped."""

    def __init__(self, space: HFMixtureSpace, device: str):
        super().__init__(space.base_path, space.base.names(), space.cfg.dtype, device)
        self.space = space

    def materialize(self, recipe: dict):
        """Write sum_s c_s * seed_s into every cell of the resident model's parameters, in place."""
        import torch

        c = self.space.cell_coefficients(recipe)
        with torch.no_grad():
            for name, idx in self.space.tensor_cells.items():
                out = self.targets.get(name)
                if out is None:
                    continue
                flat = out.view(-1)
                seeds = [ck.tensor(name).reshape(-1) for ck in self.space.seed_models.values()]
                for i in idx:
                    _, lo, hi = self.space.cells[i]
                    acc = torch.zeros(hi - lo, dtype=torch.float32, device=out.device)
                    for coef, t in zip(c[i], seeds):
                        if coef != 0.0:
                            acc.add_(t[lo:hi].to(out.device, torch.float32, non_blocking=True), alpha=float(coef))
                    flat[lo:hi].copy_(acc)
        return self.model
