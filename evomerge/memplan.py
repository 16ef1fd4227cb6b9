"""The memory plan of a merging worker: where each merge input lives, and what moves per candidate.

A worker of an `hf_merge` space holds its *resident model* (the model merged into, on its device, in
`space.dtype`) and the *merge inputs* of every floating-point tensor (integer buffers are not merged):

* task-vector methods (task_arithmetic, ties, dare_ties, dare_linear, breadcrumbs, breadcrumbs_ties):
  the base and one task vector (expert - base) per expert, the deltas in `space.delta_dtype`;
* `linear`: one full expert per expert (no base); `slerp`: the base and its one expert;
* the per-tensor methods (della, sce, ram, model_stock, nuslerp, multislerp, karcher, nearswap, ...:
  `methods.Method.kernel` "tensor"): the base and every expert, raw. They merge one whole tensor at a
  time, so what is streamed is staged a whole tensor at a time (all its inputs together), not in slices.

Base and experts keep their checkpoint dtype. Each input is placed in a tier: `device` (beside the
resident model), `host` (host memory: the page cache of the memory-mapped files, read ahead at start-up,
one copy per node shared by its workers; copied to the GPU through pinned staging buffers) or `disk`
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

Everything here reads headers and configs only (`headers.py`): no weights, no torch unless a GPU is
asked about. The plan of a space's worker is `HFMergeSpace.memory_plan`.
"""
from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from pydantic import Field

from .headers import DTYPE_BYTES, FLOATING, MIB, NAMES, nbytes, numel, st_dtype
from .methods import METHODS
from .schema import Frozen

GIB = 2 ** 30
ASSUMED_H2D_GBPS = 20.0
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
        kind = METHODS[self.method].inputs if self.method in METHODS else "task_vectors"
        inputs = {"experts": f"{e} experts", "slerp": "the base and 1 expert"}.get(
            kind, f"the base and {e} task vectors")
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
    """(kind, label) of the merge inputs of every tensor for this method (its `methods.Method.inputs`)."""
    inputs = METHODS[method].inputs if method in METHODS else None
    if inputs == "experts":
        return [("expert", lbl) for lbl in labels]
    if inputs == "slerp":
        return [("base", "base"), ("expert", labels[0])]
    if inputs == "task_vectors":
        return [("base", "base"), *[("delta", lbl) for lbl in labels]]
    if inputs == "base_experts":
        return [("base", "base"), *[("expert", lbl) for lbl in labels]]
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


def stats_bytes(method: str, tensors: dict[str, tuple[tuple[int, ...], str]], experts: int) -> tuple[int, str]:
    """(host bytes, what) of the statistics a worker of a per-tensor method prepares once and keeps in host memory
    (`ops_taskvec.py`): della / della_linear, each task-vector entry's magnitude rank within its row (int16 for
    rows of at most 32768 entries, else int32) per expert; sce, the rank of each entry's variance across the
    experts (int32) per tensor. The others keep per-tensor numbers only (0)."""
    total = 0
    for shape, dt in tensors.values():
        if dt not in FLOATING:
            continue
        n = numel(shape)
        if method in ("della", "della_linear"):
            row = shape[1] if len(shape) >= 2 else n
            total += n * experts * (2 if row <= 1 << 15 else 4)
        elif method == "sce":
            total += 4 * n
    what = {"della": "magnitude ranks, 2 bytes per entry per expert", "sce": "variance ranks, 4 bytes per entry"}
    return total, what.get(method.split("_")[0], "")


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
    res_dt, delta_dt = st_dtype(resident_dtype), st_dtype(delta_dtype)
    kinds = inputs_of(method, labels)
    notes = []

    resident = sum(nbytes(s, res_dt if (res_dt and d in FLOATING) else d) for s, d in tensors.values())
    params = sum(numel(s) for s, _ in tensors.values())
    groups = []  # (name, [(kind, label, bytes)], total) per floating-point tensor
    for name, (shape, dt) in tensors.items():
        if dt not in FLOATING:
            continue
        items = [(k, lbl, nbytes(shape, (delta_dt or dt) if k == "delta" else dt)) for k, lbl in kinds]
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
    stats, stats_what = stats_bytes(method, tensors, len(labels))
    if stats:  # prepared once per worker, kept in host memory: out of the host tier's budget
        notes.append(f"{method} prepares its statistics once per worker in host memory: {gib(stats)} per worker "
                     f"({stats_what}), {gib(stats * workers_per_node)} per node")
        host_budget = max(0, host_budget - stats * workers_per_node)

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
    if stats and stats * workers_per_node > 0.9 * host_bytes:
        return _plan({}, 0, False, f"space.method: {method}'s statistics ({stats_what}) need {gib(stats)} of host "
                                   f"memory per worker, {gib(stats * workers_per_node)} for the node's "
                                   f"{workers_per_node} worker(s), above 90% of its {gib(host_bytes)} RAM; use "
                                   f"fewer experts or workers per node, or a method without them (e.g. dare_ties)")
    if budget is None:
        return _plan(_all("device"), 0)
    if resident + reserve > budget:
        # only what would help: a 16-bit resident model, a larger budget on this GPU, a smaller reserve
        half = 0  # the resident model with every wider floating-point tensor in bfloat16
        for s, d in tensors.values():
            kept = (res_dt or d) if d in FLOATING else d
            half += nbytes(s, "BF16" if d in FLOATING and DTYPE_BYTES[kept] > 2 else kept)
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
    whole = METHODS[method].kernel == "tensor" if method in METHODS else False
    # per-tensor methods stage one whole tensor's inputs at a time (not double-buffered), slices otherwise
    staging = len(kinds) * largest if whole else 2 * len(kinds) * min(memory.slice_mib * MIB, largest)
    if staging > room:
        what = (f"{len(kinds)} inputs x the largest tensor, {gib(largest)}" if whole else
                f"2 x {len(kinds)} inputs x up to {memory.slice_mib} MiB")
        why = (f"space.memory: the streaming buffers ({gib(staging)}: {what}) do not fit beside the resident model "
               f"({gib(resident)}) and the reserve "
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


# what a space plans for -----------------------------------------------------------------------------

def plan_device(device: str, memory: MemoryConfig) -> tuple[str, int | None]:
    """("cuda" | "cpu", the GPU's memory or None) a worker on `device` (a space's `device`: auto, cpu, cuda[:i])
    is planned for: auto is cuda when memory.gpu_gib is set or this machine has a GPU; the GPU's memory is
    memory.gpu_gib, else this machine's (None when it has none)."""
    dev = str(device)
    if dev == "auto":
        dev = "cuda" if memory.gpu_gib is not None or local_cuda() else "cpu"
    dev = "cuda" if dev.startswith("cuda") else "cpu"
    if dev == "cpu":
        return dev, None
    return dev, int(memory.gpu_gib * GIB) if memory.gpu_gib is not None else local_gpu_bytes()


def cache_room(root: Path, keyed: Path | None, labels, tensors: dict, delta_dtype: str,
               magnitude_tables: bool) -> str:
    """"" when the task-vector cache can take the deltas still to be written, else the refusal.

    root: the cache root the user named (or the default); keyed: this model set's directory under it (None:
    not known here, every expert counted); tensors: the base's (name -> (shape, dtype)); magnitude_tables:
    the method also stores each delta's magnitude table (`kernels.MagnitudeTable`)."""
    dt = st_dtype(delta_dtype)
    floats = [(s, dt or d) for s, d in tensors.values() if d in FLOATING]
    one = sum(nbytes(s, d) for s, d in floats)
    todo = [lbl for lbl in labels if keyed is None or not (keyed / f"{lbl}.safetensors").exists()]
    need = one * len(todo)
    tables = 0
    if magnitude_tables:
        table = sum(4 * numel(s) if DTYPE_BYTES[d] > 2 else 12 * min(numel(s), 1 << 15) for s, d in floats)
        tables = table * sum(1 for lbl in labels
                             if keyed is None or not (keyed / f"{lbl}.magnitudes.safetensors").exists())
        need += tables
    if not need:
        return ""
    probe = keyed or root
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
    n = len(todo) or len(labels)
    parts = f"{gib(one)} each in delta_dtype {delta_dtype}" + (f", {gib(tables)} of magnitude tables" if tables else "")
    return (f"space.cache_dir: {root}: the task vectors of {n} expert{'s' if n != 1 else ''} need {gib(need)} "
            f"({parts}) and its disk has {gib(free)} free; free space, set space.cache_dir to a larger disk{hint}")
