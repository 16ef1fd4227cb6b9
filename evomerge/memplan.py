"""The memory plan of a merging worker: where each merge input lives, and what moves per candidate.

A worker of an `hf_merge` space holds its *resident model* (the model merged into, on its device, in
`space.dtype`) and the *merge inputs* of every floating-point tensor (integer buffers are not merged):

* task-vector methods (task_arithmetic, ties, dare_ties, dare_linear, breadcrumbs, breadcrumbs_ties):
  the base and one task vector (expert - base) per expert, the deltas in `space.delta_dtype`;
* `linear`: one full expert per expert (no base); `slerp`: the base and its one expert.

Base and experts keep their checkpoint dtype. Each input is placed in a tier: `device` (beside the
resident model), `host` (host memory: the page cache of the memory-mapped files, read ahead at start-up, one copy per node shared by its workers; copied to the GPU through pinned staging buffers) or `disk`
(memory-mapped from the safetensors files, read through the page cache). What is not on the device is
streamed to it for every candidate, in slices of at most `memory.slice_mib` MiB per input,
double-buffered, so streaming costs staging buffers of 2 x (inputs of one tensor) x min(slice, largest
input) on the device.

Placement (`make_plan`): the budget (memory.budget_gib, default 90% of the GPU; unlimited on CPU) less
the resident model and the reserve (memory.reserve_gib, default 10% of the GPU and at least 1 GiB; 0 on
CPU) is what the inputs may use on the device. If they all fit, they all stay there. Otherwise the
staging buffers are set aside, whole tensors (all inputs of one tensor together) go to the device
first-fit in checkpoint order, then to the host while the host budget (memory.host_gib, default half
the node's RAM) lasts, the rest to disk.

Everything here reads headers and configs only: no weights, no torch unless a GPU is asked about.
"""
from __future__ import annotations

import json
import os
import shutil
import struct
from dataclasses import dataclass, field, replace
from pathlib import Path

from pydantic import Field

from .errors import UserError
from .schema import Frozen

GIB = 2 ** 30
MIB = 2 ** 20
ASSUMED_H2D_GBPS = 20.0

MAGNITUDE_METHODS = ("ties", "breadcrumbs", "breadcrumbs_ties")  # their caches also hold magnitude tables
TASK_VECTOR_METHODS = ("task_arithmetic", "ties", "dare_ties", "dare_linear", "breadcrumbs", "breadcrumbs_ties")
ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")
TIERS = ("device", "host", "disk")


class MemoryConfig(Frozen):
    """Where a worker keeps the merge inputs (base, experts, task vectors), planned before the run starts
    (shown by --dry-run; a run whose worker does not fit is refused)."""

    budget_gib: float | None = Field(None, gt=0, description="device memory a worker may use, GiB (default: 90% "
                                                             "of its GPU; unlimited on CPU)")
    reserve_gib: float | None = Field(None, ge=0, description="part of the budget kept for the fitness's working "
                                                              "memory (activations), GiB (default: 10% of the GPU, "
                                                              "at least 1; 0 on CPU)")
    host_gib: float | None = Field(None, ge=0, description="host memory for the host tier (inputs kept in the page "
                                                           "cache), shared by the workers of a node, GiB (default: "
                                                           "half the node's RAM)")
    gpu_gib: float | None = Field(None, gt=0, description="GPU memory to plan for when planning on a machine "
                                                          "without that GPU (default: detected)")
    h2d_gbps: float | None = Field(None, gt=0, description="host-to-device bandwidth for the plan's transfer "
                                                           "estimate, GB/s (default: measured on a GPU, else 20)")
    slice_mib: int = Field(64, ge=1, description="largest piece of one input streamed at a time, MiB")


# safetensors dtypes ---------------------------------------------------------------------------

DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1,
               "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U64": 8, "U32": 4, "U16": 2, "U8": 1, "BOOL": 1}
FLOATING = ("F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2")
NAMES = {"float64": "F64", "float32": "F32", "float16": "F16", "bfloat16": "BF16"}  # torch name -> safetensors


def _st_dtype(name: str) -> str | None:
    """"bfloat16" / "torch.bfloat16" -> "BF16"; "auto" -> None (each tensor keeps its own)."""
    name = str(name).removeprefix("torch.")
    if name == "auto":
        return None
    if name not in NAMES:
        raise ValueError(f"dtype {name}: not one of {', '.join(NAMES)} or auto")
    return NAMES[name]


def _nbytes(shape: tuple[int, ...], dtype: str) -> int:
    n = DTYPE_BYTES[dtype]
    for d in shape:
        n *= d
    return n


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


# the tensors of a model, from headers or its config -----------------------------------------------

def model_tensors(path: str | Path) -> dict[str, tuple[tuple[int, ...], str]]:
    """name -> (shape, safetensors dtype) of a model directory, in checkpoint order, reading only the
    safetensors headers (`model.safetensors`, or the shards of `model.safetensors.index.json`); a
    directory with only `config.json` has its tensors derived from the config (Llama, Mistral, Qwen2)."""
    p = Path(path)
    index, single, config = p / "model.safetensors.index.json", p / "model.safetensors", p / "config.json"
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
            if not isinstance(weight_map, dict):
                raise TypeError("weight_map is not a mapping")
        except (ValueError, KeyError, TypeError) as e:
            raise UserError(f"{index}: not a safetensors index ({e})") from None
        headers: dict[str, dict] = {}
        out = {}
        for name, shard in weight_map.items():
            file = p / shard
            if shard not in headers:
                if not file.exists():
                    raise UserError(f"{p}: shard {file} listed in the index does not exist")
                headers[shard] = read_header(file)
            if name not in headers[shard]:
                raise UserError(f"{file}: no tensor {name}, which {index.name} places there")
            out[name] = headers[shard][name]
        return out
    if single.exists():
        return read_header(single)
    if config.exists():
        return config_tensors(config)
    raise UserError(f"{p}: no model.safetensors, model.safetensors.index.json or config.json")


def read_header(file: str | Path) -> dict[str, tuple[tuple[int, ...], str]]:
    """name -> (shape, dtype) from a safetensors file's header (8-byte little-endian length, then JSON)."""
    file = Path(file)
    try:
        with open(file, "rb") as f:
            head = f.read(8)
            size = os.fstat(f.fileno()).st_size
            if len(head) < 8:
                raise UserError(f"{file}: not a safetensors file (shorter than its 8-byte header length)")
            (n,) = struct.unpack("<Q", head)
            if n > size - 8 or n > 100 * MIB:
                raise UserError(f"{file}: not a safetensors file (a header of {n} bytes in a file of {size})")
            raw = f.read(n)
    except OSError as e:
        raise UserError(f"{file}: cannot read ({e.strerror or e})") from None
    try:
        header = json.loads(raw)
        if not isinstance(header, dict):
            raise ValueError("the header is not a JSON object")
        out = {}
        for name, meta in header.items():
            if name == "__metadata__":
                continue
            dtype, shape = meta["dtype"], tuple(int(d) for d in meta["shape"])
            if dtype not in DTYPE_BYTES:
                raise ValueError(f"tensor {name}: dtype {dtype} is not known here")
            out[name] = (shape, dtype)
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise UserError(f"{file}: not a safetensors header ({e})") from None
    return out


def config_tensors(config: str | Path) -> dict[str, tuple[tuple[int, ...], str]]:
    """The tensors a LlamaForCausalLM / MistralForCausalLM / Qwen2ForCausalLM checkpoint of this config.json
    holds, as Hugging Face names them (tied embeddings: no lm_head; rotary inv_freq is not stored)."""
    config = Path(config)
    try:
        c = json.loads(config.read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"{config}: not a readable JSON config ({e})") from None
    if not isinstance(c, dict):
        raise UserError(f"{config}: not a JSON object")
    archs = c.get("architectures") or []
    arch = next((a for a in archs if a in ARCHITECTURES), None)
    if arch is None:
        named = ", ".join(map(str, archs)) or f"model_type {c.get('model_type')}"
        raise UserError(f"{config}: no weights beside it, and its architecture ({named}) cannot be planned from "
                        f"the config alone; supported: {', '.join(ARCHITECTURES)}")
    try:
        dtype = _st_dtype(c.get("torch_dtype") or c.get("dtype") or "float32") or "F32"
        h, inter, layers = int(c["hidden_size"]), int(c["intermediate_size"]), int(c["num_hidden_layers"])
        heads, vocab = int(c["num_attention_heads"]), int(c["vocab_size"])
        kv = int(c.get("num_key_value_heads") or heads)
        hd = int(c.get("head_dim") or h // heads)
    except KeyError as e:
        raise UserError(f"{config}: no {e.args[0]}") from None
    except (ValueError, TypeError) as e:
        raise UserError(f"{config}: {e}") from None
    tied = bool(c.get("tie_word_embeddings", False))
    qkv_bias = arch == "Qwen2ForCausalLM" or bool(c.get("attention_bias", False))
    o_bias = arch != "Qwen2ForCausalLM" and bool(c.get("attention_bias", False))
    mlp_bias = arch == "LlamaForCausalLM" and bool(c.get("mlp_bias", False))
    out = {"model.embed_tokens.weight": ((vocab, h), dtype)}
    for i in range(layers):
        a, m = f"model.layers.{i}.self_attn", f"model.layers.{i}.mlp"
        for proj, rows in (("q_proj", heads * hd), ("k_proj", kv * hd), ("v_proj", kv * hd)):
            out[f"{a}.{proj}.weight"] = ((rows, h), dtype)
            if qkv_bias:
                out[f"{a}.{proj}.bias"] = ((rows,), dtype)
        out[f"{a}.o_proj.weight"] = ((h, heads * hd), dtype)
        if o_bias:
            out[f"{a}.o_proj.bias"] = ((h,), dtype)
        for proj, shape in (("gate_proj", (inter, h)), ("up_proj", (inter, h)), ("down_proj", (h, inter))):
            out[f"{m}.{proj}.weight"] = (shape, dtype)
            if mlp_bias:
                out[f"{m}.{proj}.bias"] = ((shape[0],), dtype)
        out[f"model.layers.{i}.input_layernorm.weight"] = ((h,), dtype)
        out[f"model.layers.{i}.post_attention_layernorm.weight"] = ((h,), dtype)
    out["model.norm.weight"] = ((h,), dtype)
    if not tied:
        out["lm_head.weight"] = ((vocab, h), dtype)
    return out


# the plan --------------------------------------------------------------------------------------

def gib(n: float | None) -> str:
    """Bytes as GiB, with the precision a small model still shows."""
    if n is None:
        return "unlimited"
    g = n / GIB
    return f"{g:.1f} GiB" if g >= 10 else f"{g:.2f} GiB" if g >= 0.01 else f"{n / MIB:.2f} MiB"


def _count(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M" if n >= 1e6 else f"{n:,}"


@dataclass(frozen=True)
class Plan:
    """Where one worker keeps each merge input, and what that costs per candidate (bytes)."""

    device: str                      # "cuda" | "cpu"
    gpu_bytes: int | None            # the GPU planned for (None: on CPU, or not known here)
    budget: int | None               # device memory the worker may use (None: unlimited)
    reserve: int                     # kept free within the budget for the fitness's working memory
    resident: int                    # the resident model in its dtype
    staging: int                     # streaming buffers on the device (0: nothing streams)
    tiers: dict[tuple[str, str, str], str]   # (kind, label, tensor) -> device | host | disk
    bytes_per_tier: dict[str, int]   # per worker for device; per node for host (one shared copy) and disk
    streamed_bytes: int              # moved host/disk -> device for every candidate
    h2d_gbps: float
    h2d_source: str                  # "measured" | "assumed" | "memory.h2d_gbps"
    transfer_s: float                # streamed_bytes at h2d_gbps
    fits: bool
    why: str                         # the one-line refusal when it does not fit ("" when it fits)
    method: str = ""
    labels: tuple[str, ...] = ()
    workers_per_node: int = 1
    host_budget: int = 0             # host memory the node may use for the host tier
    inputs_bytes: int = 0            # every merge input, wherever it lives
    inputs_per_tensor: int = 0
    params: int = 0                  # parameters of the model (elements of its tensors)
    tensors: int = 0                 # merged (floating-point) tensors
    streamed_tensors: int = 0
    notes: tuple[str, ...] = field(default=())

    @property
    def h2d_measured(self) -> bool:
        return self.h2d_source == "measured"

    def tier(self, kind: str, label: str, name: str) -> str:
        """Where input (kind: base | delta | expert, label: the expert's or "base", tensor name) lives."""
        try:
            return self.tiers[(kind, label, name)]
        except KeyError:
            raise KeyError(f"({kind}, {label}, {name}) is not a merge input of this plan") from None

    def lines(self) -> list[str]:
        """A compact table for --dry-run."""
        e = len(self.labels)
        inputs = {"linear": f"{e} experts", "slerp": "the base and 1 expert"}.get(
            self.method, f"the base and {e} task vectors")
        where = "its GPU" if self.device == "cuda" else "the CPU"
        gpu = f" of a {gib(self.gpu_bytes)} GPU" if self.gpu_bytes else ""
        out = [f"memory plan ({where}, per worker; {self.workers_per_node} worker"
               f"{'s' if self.workers_per_node != 1 else ''} per node):",
               f"  model {_count(self.params)} parameters; resident {gib(self.resident)}, "
               f"inputs {gib(self.inputs_bytes)} ({inputs}: {self.inputs_per_tensor} per tensor, "
               f"{self.tensors} tensors)",
               f"  budget {gib(self.budget)}{gpu}, reserve {gib(self.reserve)}, staging {gib(self.staging)}"]
        per = {"device": "per worker, beside the resident model",
               "host": f"in host memory (page cache, read ahead), one copy per node (budget {gib(self.host_budget)})",
               "disk": "memory-mapped, read through the page cache"}
        if self.device == "cpu" and not self.streamed_bytes:
            per["device"] = "read in place from the memory-mapped files (page cache, shared by a node's workers)"
        if self.tiers:
            for t in TIERS:
                out.append(f"  {t:<7}{gib(self.bytes_per_tier.get(t, 0)):>12}  {per[t]}")
            if self.streamed_bytes:
                by = ", ".join(f"{t} {gib(self.bytes_per_tier[t])}" for t in ("host", "disk")
                               if self.bytes_per_tier[t])
                out.append(f"  streams {self.streamed_tensors} of {self.tensors} tensors ({by}): "
                           f"{self.streamed_bytes / 1e9:.2f} GB per candidate, ~{self.transfer_s:.2f} s at "
                           f"{self.h2d_gbps:g} GB/s ({self.h2d_source})")
            else:
                out.append("  nothing streams: 0 bytes moved per candidate")
        out += [f"  note: {n}" for n in self.notes]
        out.append("  fits" if self.fits else f"  does not fit: {self.why}")
        return out


def inputs_of(method: str, labels: list[str] | tuple[str, ...]) -> list[tuple[str, str]]:
    """(kind, label) of the merge inputs of every tensor for this method."""
    if method == "linear":
        return [("expert", lbl) for lbl in labels]
    if method == "slerp":
        return [("base", "base"), ("expert", labels[0])]
    if method in TASK_VECTOR_METHODS:
        return [("base", "base"), *[("delta", lbl) for lbl in labels]]
    raise ValueError(f"method {method}: no memory plan for it")


def host_ram() -> int:
    """The node's RAM in bytes (/proc/meminfo MemTotal, else sysconf)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def make_plan(tensors: dict[str, tuple[tuple[int, ...], str]], *, method: str, labels, resident_dtype: str,
              delta_dtype: str, device: str, memory: MemoryConfig, gpu_bytes: int | None = None,
              gpu_share: float = 1.0,
              host_bytes: int | None = None, workers_per_node: int = 1, measure_h2d: bool = True) -> Plan:
    """The plan of one worker merging `tensors` (name -> (shape, safetensors dtype), checkpoint order).

    resident_dtype / delta_dtype: "float32" / "bfloat16" / "float16", or "auto" (each tensor's own dtype).
    device: "cuda" or "cpu". gpu_bytes: the GPU's memory (cuda; None: unknown, planned as unlimited).
    gpu_share: the worker's share of that GPU (engine.gpus_per_worker below 1: workers sharing a GPU), which
    scales the default budget and reserve.
    host_bytes: the node's RAM (default: this machine's). measure_h2d: time a pinned copy on a local GPU
    when something streams and memory.h2d_gbps is not set (else 20 GB/s is assumed)."""
    labels = tuple(labels)
    res_dt, delta_dt = _st_dtype(resident_dtype), _st_dtype(delta_dtype)
    kinds = inputs_of(method, labels)
    notes = []

    resident = sum(_nbytes(s, res_dt if (res_dt and d in FLOATING) else d) for s, d in tensors.values())
    params = sum(_numel(s) for s, _ in tensors.values())
    groups = []  # (name, [(kind, label, bytes)], total) per floating-point tensor
    for name, (shape, dt) in tensors.items():
        if dt not in FLOATING:
            continue
        items = [(k, lbl, _nbytes(shape, (delta_dt or dt) if k == "delta" else dt)) for k, lbl in kinds]
        groups.append((name, items, sum(b for _, _, b in items)))
    total = sum(g[2] for g in groups)
    largest = max((b for _, items, _ in groups for _, _, b in items), default=0)

    if device == "cuda":
        budget = (int(memory.budget_gib * GIB) if memory.budget_gib is not None
                  else int(0.9 * gpu_bytes * gpu_share) if gpu_bytes else None)
        reserve = (int(memory.reserve_gib * GIB) if memory.reserve_gib is not None
                   else max(GIB, int(0.1 * gpu_bytes * gpu_share)) if gpu_bytes else GIB)
        if budget is None:
            notes.append("the GPU's memory is not known here (no GPU on this machine): set space.memory.gpu_gib "
                         "to plan for the workers' GPU")
    else:
        budget = int(memory.budget_gib * GIB) if memory.budget_gib is not None else None
        reserve = int(memory.reserve_gib * GIB) if memory.reserve_gib is not None else 0
    host_bytes = host_ram() if host_bytes is None else int(host_bytes)
    host_budget = int(memory.host_gib * GIB) if memory.host_gib is not None else host_bytes // 2

    common = dict(device=device, gpu_bytes=gpu_bytes, budget=budget, reserve=reserve, resident=resident,
                  method=method, labels=labels, workers_per_node=workers_per_node, host_budget=host_budget,
                  inputs_bytes=total, inputs_per_tensor=len(kinds), params=params, tensors=len(groups))

    def _plan(tiers, staging, fits=True, why="") -> Plan:
        per = dict.fromkeys(TIERS, 0)
        streamed_tensors = set()
        for name, items, _ in groups:
            for k, lbl, b in items:
                t = tiers.get((k, lbl, name))
                if t is None:  # a plan that does not fit places nothing
                    continue
                per[t] += b
                if t != "device":
                    streamed_tensors.add(name)
        streamed = per["host"] + per["disk"]
        h2d = (ASSUMED_H2D_GBPS, "assumed")
        if memory.h2d_gbps is not None:
            h2d = (memory.h2d_gbps, "memory.h2d_gbps")
        elif streamed and device == "cuda" and measure_h2d and local_cuda():
            h2d = (measure_h2d_gbps(), "measured")
        return Plan(tiers=tiers, staging=staging, bytes_per_tier=per, streamed_bytes=streamed,
                    h2d_gbps=h2d[0], h2d_source=h2d[1], transfer_s=streamed / (h2d[0] * 1e9),
                    fits=fits, why=why, streamed_tensors=len(streamed_tensors), notes=tuple(notes), **common)

    def _all(tier: str) -> dict:
        return {(k, lbl, name): tier for name, items, _ in groups for k, lbl, _ in items}

    gpu = f" of a {gib(gpu_bytes)} GPU" if gpu_bytes else ""
    if budget is None:
        return _plan(_all("device"), 0)
    if resident + reserve > budget:
        # only what would help: a 16-bit resident model, a larger budget on this GPU, a smaller reserve
        half = 0  # the resident model with every wider floating-point tensor in bfloat16
        for s, d in tensors.values():
            kept = (res_dt or d) if d in FLOATING else d
            half += _nbytes(s, "BF16" if d in FLOATING and DTYPE_BYTES[kept] > 2 else kept)
        hints = ["a GPU with more memory" if device == "cuda" else "a larger memory.budget_gib"]
        if half < resident and half <= budget:
            hints.append("space.dtype: bfloat16")
        if device == "cuda" and memory.budget_gib is not None and gpu_bytes and resident + reserve < gpu_bytes:
            hints.append("a larger memory.budget_gib")
        if reserve and resident < budget:
            hints.append("a smaller memory.reserve_gib")
        hint = ", ".join(hints[:-1]) + " or " + hints[-1] if len(hints) > 1 else hints[0]
        if res_dt is None:  # auto: name the checkpoint's dtype(s)
            names = {v: k for k, v in NAMES.items()}
            found = sorted({names.get(d, d) for _, d in tensors.values() if d in FLOATING})
            resident_dtype = "/".join(found)
        why = (f"space.memory: the resident model ({gib(resident)} in {resident_dtype}) and the reserve "
               f"({gib(reserve)}) do not fit in the worker's budget ({gib(budget)}{gpu}); use {hint}")
        return _plan({}, 0, False, why)
    if total <= budget - resident - reserve:
        return _plan(_all("device"), 0)
    room = budget - resident - reserve
    staging = 2 * len(kinds) * min(memory.slice_mib * MIB, largest)
    if staging > room:
        why = (f"space.memory: the streaming buffers ({gib(staging)}: 2 x {len(kinds)} inputs x up to "
               f"{memory.slice_mib} MiB) do not fit beside the resident model ({gib(resident)}) and the reserve "
               f"({gib(reserve)}) in the budget ({gib(budget)}{gpu}); lower memory.slice_mib or "
               f"memory.reserve_gib, or use a GPU with more memory")
        return _plan({}, staging, False, why)
    room -= staging
    host_left = host_budget
    tiers = {}
    for name, items, size in groups:  # whole tensors, first fit in checkpoint order
        if size <= room:
            tier, room = "device", room - size
        elif size <= host_left:
            tier, host_left = "host", host_left - size
        else:
            tier = "disk"
        for k, lbl, _ in items:
            tiers[(k, lbl, name)] = tier
    if any(t == "disk" for t in tiers.values()):
        notes.append("the disk tier streams at page-cache speed only while the files stay cached; raise "
                     "memory.host_gib (the node's RAM permitting) to keep more in host memory")
    return _plan(tiers, staging)


# this machine's GPU ------------------------------------------------------------------------------

def local_cuda() -> bool:
    """Whether this machine has a usable CUDA GPU (no NVIDIA device nodes: no, without importing torch)."""
    if not any(Path("/dev").glob("nvidia[0-9]*")) and not Path("/dev/dxg").exists():
        return False
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


def local_gpu_bytes() -> int | None:
    """The memory of this machine's smallest visible GPU (None: no GPU)."""
    if not local_cuda():
        return None
    import torch

    return min(torch.cuda.get_device_properties(i).total_memory for i in range(torch.cuda.device_count()))


_MEASURED: list[float] = []


def measure_h2d_gbps(mib: int = 256, repeats: int = 4) -> float:
    """Pinned host -> device copy bandwidth of this machine's GPU, GB/s (the best of a few copies; once)."""
    if not _MEASURED:
        import time

        import torch

        src = torch.empty(mib * MIB, dtype=torch.uint8, pin_memory=True)
        dst = torch.empty_like(src, device="cuda")
        dst.copy_(src, non_blocking=True)
        torch.cuda.synchronize()
        best = float("inf")
        for _ in range(repeats):
            t = time.perf_counter()
            dst.copy_(src, non_blocking=True)
            torch.cuda.synchronize()
            best = min(best, time.perf_counter() - t)
        _MEASURED.append(src.numel() / best / 1e9)
        del src, dst
        torch.cuda.empty_cache()
    return _MEASURED[0]


# a space's plan ------------------------------------------------------------------------------------

def plan_for_space(space_cfg, workers_per_node: int, *, measure_h2d: bool = True, gpu_share: float = 1.0) -> Plan:
    """The plan of one worker of an hf_merge space (its config), reading headers only; with task-vector
    methods, also whether the task-vector cache has room for the deltas."""
    from .spaces.hf_merge import resolve_model

    memory = getattr(space_cfg, "memory", None) or MemoryConfig()
    base = resolve_model(space_cfg.models.base, "base")
    experts = {k: resolve_model(v, f"experts.{k}") for k, v in space_cfg.models.experts.items()}
    tensors = model_tensors(base)
    dev = str(space_cfg.device)
    if dev == "auto":
        dev = "cuda" if memory.gpu_gib is not None or local_cuda() else "cpu"
    dev = "cuda" if dev.startswith("cuda") else "cpu"
    gpu_bytes = None
    if dev == "cuda":
        gpu_bytes = int(memory.gpu_gib * GIB) if memory.gpu_gib is not None else local_gpu_bytes()
    delta_dtype = getattr(space_cfg, "delta_dtype", "auto")
    plan = make_plan(tensors, method=space_cfg.method, labels=list(space_cfg.models.experts),
                     resident_dtype=space_cfg.dtype, delta_dtype=delta_dtype, device=dev, memory=memory,
                     gpu_bytes=gpu_bytes, gpu_share=gpu_share, workers_per_node=workers_per_node,
                     measure_h2d=measure_h2d)
    if plan.fits and space_cfg.method in TASK_VECTOR_METHODS:
        why = _cache_room(space_cfg, base, experts, tensors, delta_dtype)
        if why:
            plan = replace(plan, fits=False, why=why)
    return plan


def _task_vector_dir(space_cfg, base: Path, experts: dict[str, Path]) -> Path | None:
    """The directory the space writes this model set's task vectors to (None: not known here)."""
    from types import SimpleNamespace

    from .spaces.hf_merge import HFMergeSpace

    try:
        return Path(HFMergeSpace.task_vector_dir(SimpleNamespace(cfg=space_cfg, base_path=base,
                                                                 expert_paths=experts)))
    except Exception:  # noqa: BLE001 - its key needs more of the space than a config: plan for the root
        return None


def _cache_room(space_cfg, base: Path, experts: dict[str, Path], tensors: dict, delta_dtype: str) -> str:
    """"" when the task-vector cache can take the deltas still to be written, else the refusal."""
    root = Path(space_cfg.cache_dir).expanduser() if space_cfg.cache_dir else (
        Path.home() / ".cache" / "evomerge" / "task_vectors")
    dt = _st_dtype(delta_dtype)
    floats = [(s, dt or d) for s, d in tensors.values() if d in FLOATING]
    one = sum(_nbytes(s, d) for s, d in floats)
    keyed = _task_vector_dir(space_cfg, base, experts)
    todo = [lbl for lbl in experts if keyed is None or not (keyed / f"{lbl}.safetensors").exists()]
    need = one * len(todo)
    tables = 0
    if space_cfg.method in MAGNITUDE_METHODS:  # each delta's magnitude table (kernels.MagnitudeTable)
        table = sum(4 * _numel(s) if DTYPE_BYTES[d] > 2 else 12 * min(_numel(s), 1 << 15) for s, d in floats)
        tables = table * sum(1 for lbl in experts
                             if keyed is None or not (keyed / f"{lbl}.magnitudes.safetensors").exists())
        need += tables
    if not need:
        return ""
    where = keyed or root
    probe = where
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    try:
        free = shutil.disk_usage(probe).free
    except OSError:
        return ""
    if need <= free:
        return ""
    wide = any(DTYPE_BYTES[dt or d] > 2 for _, d in tensors.values() if d in FLOATING)
    hint = ", or space.delta_dtype: bfloat16" if wide else ""
    n = len(todo) or len(experts)
    parts = f"{gib(one)} each in delta_dtype {delta_dtype}" + (f", {gib(tables)} of magnitude tables" if tables else "")
    return (f"space.cache_dir: {root}: the task vectors of {n} expert{'s' if n != 1 else ''} need {gib(need)} "
            f"({parts}) and its disk has {gib(free)} free; free space, set space.cache_dir to a larger disk{hint}")
