"""Model pool: a base and experts read as memory-mapped safetensors, checked against each other,
and their tensors grouped by transformer block.

A model is a local directory (or a hub id resolved to one by the caller) holding
`model.safetensors`, or shards listed in `model.safetensors.index.json`. Tensors are opened
memory-mapped (`safetensors.safe_open`), so experts cost page cache, not process memory,
and workers on one node share them.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import torch

from .errors import UserError
from .headers import NAMES

_LAYER = re.compile(r"(?:^|\.)(?:layers|h|blocks|layer)\.(\d+)\.")
_EMBED = ("embed", "wte", "wpe", "word_embeddings", "position_embeddings", "tok_embeddings")
_HEAD = ("lm_head", "score", "classifier", "output.weight")


def layer_index(name: str) -> int | None:
    """The transformer block a tensor belongs to (`model.layers.3.mlp...` -> 3), or None."""
    m = _LAYER.search(name)
    return int(m.group(1)) if m else None


def group_of(name: str, layers_per_group: int = 1, filters: Iterable[str] = ()) -> str:
    """Group label: `layers.0-1[/attn]` for blocks (k per group), else embed, head or norm.

    `filters` (substrings such as "attn", "mlp") split a block group further: a tensor goes
    to the first filter its name contains, or to the group itself.
    """
    idx = layer_index(name)
    if idx is None:
        if any(e in name for e in _EMBED):
            return "embed"
        if any(name.startswith(h) or f".{h}" in name for h in _HEAD):
            return "head"
        return "norm"
    start = idx - idx % layers_per_group
    label = f"layers.{start}" if layers_per_group == 1 else f"layers.{start}-{start + layers_per_group - 1}"
    for f in filters:
        if f in name:
            return f"{label}/{f}"
    return label


@dataclass
class Checkpoint:
    """Lazy, memory-mapped access to one model's tensors."""

    path: Path
    files: dict[str, Path]  # tensor name -> safetensors file

    @classmethod
    def open(cls, path: str | Path) -> "Checkpoint":
        p = Path(path)
        index = p / "model.safetensors.index.json"
        single = p / "model.safetensors"
        if index.exists():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (ValueError, KeyError) as e:
                raise UserError(f"{index}: not a safetensors index ({e})") from None
            files = {name: p / f for name, f in weight_map.items()}
        elif single.exists():
            from safetensors import safe_open

            with safe_open(str(single), "pt") as f:
                files = {name: single for name in f.keys()}
        else:
            raise UserError(f"{p}: no model.safetensors or model.safetensors.index.json")
        missing = sorted({str(f) for f in files.values() if not f.exists()})
        if missing:
            raise UserError(f"{p}: shard {missing[0]} listed in the index does not exist")
        return cls(p, files)

    def names(self) -> list[str]:
        return list(self.files)

    def tensor(self, name: str) -> torch.Tensor:
        """A zero-copy view of the tensor in the memory-mapped file (pages shared by every process
        that maps it; copy-on-write, so writing to the view never touches the file)."""
        return _mapped(self.files[name])[name]

    def slices(self) -> dict[str, tuple[tuple[int, ...], str]]:
        """name -> (shape, dtype) without reading any data."""
        from safetensors import safe_open

        out = {}
        for file in sorted(set(self.files.values())):
            with safe_open(str(file), "pt") as f:
                for name in f.keys():
                    sl = f.get_slice(name)
                    out[name] = (tuple(sl.get_shape()), sl.get_dtype())
        return out


    def source_files(self) -> list[Path]:
        """The files this model's tensors are read from."""
        return sorted(set(self.files.values()))


class Adapter:
    """A LoRA expert (a PEFT adapter directory: adapter_config.json + adapter_model.safetensors) seen as
    a full checkpoint: tensor(name) is the base's, plus scale * B @ A where the adapter targets it
    (scale = lora_alpha / r, or / sqrt(r) with use_rslora), as PEFT's merge_and_unload computes it."""

    def __init__(self, path: Path, base: Checkpoint):
        self.path, self.base = Path(path), base
        try:
            cfg = json.loads((self.path / "adapter_config.json").read_text())
        except ValueError as e:
            raise UserError(f"{self.path / 'adapter_config.json'}: not JSON ({e})") from None
        if cfg.get("peft_type", "LORA") != "LORA" or cfg.get("use_dora"):
            raise UserError(f"{self.path}: only plain LoRA adapters are supported (peft_type LORA, no DoRA)")
        self.file = self.path / "adapter_model.safetensors"
        if not self.file.exists():
            raise UserError(f"{self.path}: no adapter_model.safetensors")
        r, alpha = int(cfg["r"]), float(cfg.get("lora_alpha", cfg["r"]))
        self.fan_in_fan_out = bool(cfg.get("fan_in_fan_out", False))
        names = set(base.names())
        self.lora: dict[str, tuple[str, str, float]] = {}  # base tensor -> (A key, B key, scale)
        for key in _mapped(self.file):
            if ".lora_A." not in key:
                if ".lora_B." not in key:
                    raise UserError(f"{self.file}: tensor {key} is not a LoRA A/B matrix (only those are supported)")
                continue
            target = key.split(".lora_A.")[0]
            target = target[len("base_model.model."):] if target.startswith("base_model.model.") else target
            name = f"{target}.weight"
            if name not in names:
                raise UserError(f"{self.file}: {key} adapts {name}, which the base lacks")
            rank_pattern = cfg.get("rank_pattern") or {}
            alpha_pattern = cfg.get("alpha_pattern") or {}
            rr = next((int(v) for k, v in rank_pattern.items() if target.endswith(k)), r)
            aa = next((float(v) for k, v in alpha_pattern.items() if target.endswith(k)), alpha)
            scale = aa / (rr ** 0.5) if cfg.get("use_rslora") else aa / rr
            self.lora[name] = (key, key.replace(".lora_A.", ".lora_B."), scale)

    def names(self) -> list[str]:
        return self.base.names()

    def slices(self) -> dict[str, tuple[tuple[int, ...], str]]:
        return self.base.slices()

    def source_files(self) -> list[Path]:
        return sorted(set(self.base.source_files()) | {self.file})

    def tensor(self, name: str) -> torch.Tensor:
        w = self.base.tensor(name)
        if name not in self.lora:
            return w
        ka, kb, scale = self.lora[name]
        views = _mapped(self.file)
        delta = views[kb].float() @ views[ka].float()
        if self.fan_in_fan_out:
            delta = delta.T
        return (w.float() + scale * delta).to(w.dtype)


def open_expert(path: str | Path, base: Checkpoint):
    """An expert directory: a full checkpoint, or a LoRA adapter of `base`."""
    p = Path(path)
    return Adapter(p, base) if (p / "adapter_config.json").exists() else Checkpoint.open(p)


_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
           "BOOL": torch.bool}
_MAPS: dict[Path, dict[str, torch.Tensor]] = {}


def torch_dtype(name: str) -> torch.dtype:
    """The torch dtype of a config's dtype name (float64, float32, bfloat16, float16)."""
    return _DTYPES[NAMES[name]]


def _mapped(file: Path) -> dict[str, torch.Tensor]:
    """Views of every tensor of a safetensors file over one mmap of it (cached per process)."""
    import mmap
    import warnings

    file = Path(file).resolve()
    views = _MAPS.get(file)
    if views is None:
        with open(file, "rb") as f:
            buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
        n = int.from_bytes(buf[:8], "little")
        header = json.loads(buf[8:8 + n])
        header.pop("__metadata__", None)
        views = {}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for name, meta in header.items():
                start, end = meta["data_offsets"]
                dtype = _DTYPES[meta["dtype"]]
                count = (end - start) // torch.empty((), dtype=dtype).element_size()
                t = torch.frombuffer(buf, dtype=dtype, count=count, offset=8 + n + start) if count else \
                    torch.empty(0, dtype=dtype)
                views[name] = t.view(meta["shape"])
        _MAPS[file] = views
    return views


def check_compatible(base: Checkpoint, experts: dict[str, Checkpoint]) -> None:
    """Every expert has the base's tensor names and shapes; one line names model, tensor and shapes."""
    ref = base.slices()
    for label, ck in experts.items():
        got = ck.slices()
        for name in ref:
            if name not in got:
                raise UserError(f"models: expert {label} lacks tensor {name} of the base")
            if got[name][0] != ref[name][0]:
                raise UserError(f"models: expert {label} tensor {name} has shape {list(got[name][0])}, "
                                f"the base has {list(ref[name][0])}")
            # floats are cast to one dtype; other dtypes must match
            if is_float_dtype(got[name][1]) != is_float_dtype(ref[name][1]):
                raise UserError(f"models: expert {label} tensor {name} has dtype {got[name][1]}, "
                                f"the base has {ref[name][1]}")
        extra = sorted(set(got) - set(ref))
        if extra:
            raise UserError(f"models: expert {label} has tensor {extra[0]} that the base lacks")


def is_float_dtype(dtype: str) -> bool:
    return dtype.startswith(("F", "BF"))


def check_finite(label: str, ck: Checkpoint) -> None:
    """NaN or Inf in a checkpoint is an error naming the tensor."""
    for name in ck.names():
        t = ck.tensor(name)
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise UserError(f"models: {label} tensor {name} contains NaN or Inf")
