"""A merging worker's inputs, placed by its memory plan, and the per-candidate pass over them.

Every input (the base, a task vector, an expert) of every merged tensor sits in one tier of the
plan (`memplan.py`):

* device: on the worker's device for the whole run (on a CPU worker: the memory-mapped file itself,
  read in place);
* host: in host memory, the page cache of the memory-mapped safetensors file (one copy for all the
  workers of a node), read once at start-up so it is there;
* disk: the memory-mapped file, paged in by the OS when read.

`MergeInputs.units()` walks every merged tensor in slices of at most `memory.slice_mib` per input.
A slice of a tensor whose inputs are on the device is a view of them; one that is not is staged:
copied into one of two pinned host buffers by the CPU, then to one of two device buffers on a copy
stream, while the device merges the previous slice (double buffering: the CPU copy of slice j + 1,
the host-to-device copy of slice j and the merge of slice j - 1 overlap). In streaming mode the
resident model is the only full-size copy on the device. `transfer_s` is the copy engine's time
for the last pass (overlapped with the merge, so part of, not added to, the merge's wall time).
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch

Tensor = torch.Tensor


@dataclass
class Unit:
    name: str
    offset: int
    n: int
    views: list  # the slice of each input, on the device, flat
    staged: bool


class MergeInputs:
    """sources: tensor name -> [CPU tensors (memory-mapped views)]; tiers: name -> [tier per input]."""

    def __init__(self, sources: dict[str, list[Tensor]], tiers: dict[str, list[str]], device: torch.device,
                 slice_bytes: int):
        self.device = device
        self.cuda = device.type == "cuda"
        self.order = list(sources)
        self.sources = {n: [t.reshape(-1) for t in ts] for n, ts in sources.items()}
        self.tiers = tiers
        self.resident: dict[str, list[Tensor]] = {}
        self.streamed = [n for n in self.order if any(t != "device" for t in tiers[n])]
        for n in self.order:
            if n not in self.streamed:
                self.resident[n] = [self._to_device(t) for t in self.sources[n]]
        self.transfer_s: float | None = None
        self._slots = []
        if self.streamed:
            width = max(len(self.sources[n]) for n in self.streamed)
            dtypes = [_common({self.sources[n][i].dtype for n in self.streamed if i < len(self.sources[n])})
                      for i in range(width)]
            longest = max(t.numel() for n in self.streamed for t in self.sources[n])
            self.slice = max(1, min(longest, slice_bytes // max(torch.empty((), dtype=d).element_size()
                                                                 for d in dtypes)))
            for _ in range(2):
                self._slots.append(_Slot(dtypes, self.slice, device))
            for n in self.streamed:  # the host tier: read ahead into the page cache now
                for t, tier in zip(self.sources[n], tiers[n]):
                    if tier == "host":
                        _touch(t)
        else:
            self.slice = None
        self.copy_stream = torch.cuda.Stream(device) if self.cuda and self.streamed else None

    def _to_device(self, t: Tensor) -> Tensor:
        return t.to(self.device) if self.cuda else t

    def units(self, slice_elems: int | None = None):
        """Every merged tensor in slices: yields Unit; the caller merges the unit before asking for the next."""
        chunk = slice_elems or self.slice
        plan = []
        for n in self.order:
            total = self.sources[n][0].numel()
            step = chunk if (chunk and n in self.streamed) else (slice_elems or total) or 1
            for off in range(0, max(total, 1), step):
                plan.append((n, off, min(step, total - off)))
        timers = []
        staged = [k for k, (n, _, _) in enumerate(plan) if n in self.streamed]
        slot_of = {k: self._slots[i % 2] for i, k in enumerate(staged)}  # staged slices alternate slots
        following = dict(zip(staged, staged[1:]))
        if staged:
            self._stage(slot_of[staged[0]], *plan[staged[0]], timers)
        for j, (n, off, cnt) in enumerate(plan):
            if n not in self.streamed:
                yield Unit(n, off, cnt, [t[off:off + cnt] for t in self.resident[n]], False)
                continue
            slot = slot_of[j]
            nxt = following.get(j)
            if nxt is not None:  # the next staged slice goes into the other slot while this one merges
                self._stage(slot_of[nxt], *plan[nxt], timers)
            if self.cuda:
                torch.cuda.current_stream(self.device).wait_event(slot.copied)
            yield Unit(n, off, cnt, [b[:cnt] for b in slot.device_bufs[:len(self.sources[n])]], True)
            if self.cuda:
                slot.merged.record(torch.cuda.current_stream(self.device))
        if self.cuda:
            torch.cuda.synchronize(self.device)
            self.transfer_s = sum(a.elapsed_time(b) for a, b in timers) / 1000 if timers else None
        else:
            self.transfer_s = sum(timers) if timers else None

    def whole(self, name: str) -> list[Tensor]:
        """Every input of one tensor, whole and flat, on the device (the per-tensor methods,
        `tensormerge.py`): views of the resident inputs, or (a streamed tensor) copies made now, freed
        once the caller lets go of them."""
        if name not in self.streamed:
            return self.resident[name]
        t0 = time.perf_counter()
        out = [t.to(self.device) for t in self.sources[name]]
        if self.cuda:
            torch.cuda.synchronize(self.device)
        self.transfer_s = (self.transfer_s or 0.0) + time.perf_counter() - t0
        return out

    def _stage(self, slot: "_Slot", name: str, off: int, cnt: int, timers: list) -> None:
        srcs = [t[off:off + cnt] for t in self.sources[name]]
        if not self.cuda:  # a CPU device: the staging buffers are the device buffers
            t0 = time.perf_counter()
            for buf, src in zip(slot.device_bufs, srcs):
                buf[:cnt].copy_(src)
            timers.append(time.perf_counter() - t0)
            return
        slot.copied.synchronize()  # the pinned buffer's last copy to the device is done
        for buf, src in zip(slot.host_bufs, srcs):
            buf[:cnt].copy_(src)
        with torch.cuda.stream(self.copy_stream):
            self.copy_stream.wait_event(slot.merged)  # the device buffer's last merge is done
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record(self.copy_stream)
            for dev, host in zip(slot.device_bufs, slot.host_bufs):
                dev[:cnt].copy_(host[:cnt], non_blocking=True)
            end.record(self.copy_stream)
            slot.copied.record(self.copy_stream)
        timers.append((start, end))


class _Slot:
    def __init__(self, dtypes, n: int, device: torch.device):
        cuda = device.type == "cuda"
        self.device_bufs = [torch.empty(n, dtype=d, device=device) for d in dtypes]
        self.host_bufs = [torch.empty(n, dtype=d, pin_memory=True) for d in dtypes] if cuda else []
        self.copied = torch.cuda.Event() if cuda else None
        self.merged = torch.cuda.Event() if cuda else None
        if cuda:  # recorded once so the first waits pass
            self.copied.record()
            self.merged.record()


def _common(dtypes: set) -> torch.dtype:
    """The staging dtype of one input position: the inputs' own, or one that holds all of them exactly."""
    if len(dtypes) == 1:
        return next(iter(dtypes))
    return torch.float64 if torch.float64 in dtypes else torch.float32


def _touch(t: Tensor) -> None:
    """Read a memory-mapped tensor once (pages into the page cache), in 64 MiB steps."""
    step = max(1, (64 << 20) // t.element_size())
    for off in range(0, t.numel(), step):
        t[off:off + step].sum(dtype=torch.float32 if t.is_floating_point() else None)
