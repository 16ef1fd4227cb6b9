"""DARE's keep draw: a counter-based hash of (recipe seed, tensor, expert, element index).

The reference operators (`merge.dare_mask`) and the search runs' kernels (`kernels.py`) draw the same
numbers from it, so a recipe always yields the same model, on any device, whole or in slices, without
a random generator.
"""
from __future__ import annotations

import hashlib

import numpy as np
import torch

Tensor = torch.Tensor
M31 = (1 << 31) - 1
_C = (0x2545F491, 0x1B873593, 0x4F1BBCDD)  # odd multipliers < 2^31: products of two 31-bit numbers never overflow


def tensor_key(seed: int, name: str, index: int) -> int:
    """A 31-bit key of (recipe seed, tensor name, expert index): masks never depend on call order."""
    digest = hashlib.blake2b(f"{seed}:{name}:{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & M31


def _mix(idx: Tensor, key) -> Tensor:
    """A bijective 31-bit integer hash of the element index (multiply / xorshift rounds, no overflow)."""
    h = torch.bitwise_and(torch.bitwise_xor(idx, key), M31)
    for c in _C:
        h = torch.bitwise_and(h * c, M31)
        h = torch.bitwise_xor(h, h >> 15)
    return h


def uniform(key, offset, n: int, device) -> Tensor:
    """float32 uniforms in [0, 1) (24 bits) for elements offset .. offset + n - 1 of a tensor."""
    idx = torch.arange(n, dtype=torch.int64, device=device) + offset
    return (_mix(idx, key) >> 7).to(torch.float32) * (2.0 ** -24)


def dare_numbers(density: float) -> tuple[float, float]:
    """(density, 1 / density) as float32 numbers: the keep test u < density and DARE's rescale."""
    p = np.float32(density)
    return float(p), float(np.float32(1.0) / p)
