"""The embedded task: sklearn's 8x8 digits and a 64-256-10 MLP, as in the M2N2 paper.

The model is one flat float32 vector of 19,210 parameters in the order
W1 (64x256, row-major), b1 (256), W2 (256x10), b2 (10). Because b1 directly follows W1
(and b2 W2), ``x[:16640].view(65, 256)`` is W1 with b1 as an extra row and
``x[16640:].view(257, 10)`` is W2 with b2 as an extra row: inputs get a ones column
and the biases ride along in the matrix products.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch

IN, HIDDEN, OUT = 64, 256, 10
N_W1 = IN * HIDDEN
N_L1 = (IN + 1) * HIDDEN  # W1 and b1
N_PARAMS = N_L1 + (HIDDEN + 1) * OUT  # 19,210
LAYOUT = (("W1", (IN, HIDDEN)), ("b1", (HIDDEN,)), ("W2", (HIDDEN, OUT)), ("b2", (OUT,)))


@dataclass(frozen=True)
class Split:
    x: np.ndarray  # (n, 64) float32, raw pixel values 0..16 as in the paper
    y: np.ndarray  # (n,) int64


@lru_cache(maxsize=4)
def load(train_fraction: float = 0.8) -> tuple[Split, Split]:
    """First 80% of load_digits() for training (1437), the rest (360) for test; no shuffling."""
    from sklearn.datasets import load_digits

    images, labels = load_digits(return_X_y=True)
    n_train = int(len(images) * train_fraction)
    x = images.astype(np.float32)
    y = labels.astype(np.int64)
    return Split(x[:n_train], y[:n_train]), Split(x[n_train:], y[n_train:])


def unflatten(x: np.ndarray | torch.Tensor) -> dict[str, torch.Tensor]:
    """Named tensors (W1, b1, W2, b2) viewing one flat parameter vector (a copy of a read-only array,
    e.g. one from Ray's object store: torch cannot view memory it must not write)."""
    if isinstance(x, np.ndarray) and not x.flags.writeable:
        x = x.copy()
    t = torch.as_tensor(x)
    out, start = {}, 0
    for name, shape in LAYOUT:
        size = int(np.prod(shape))
        out[name] = t[start:start + size].view(shape)
        start += size
    return out


def flatten(tensors: dict[str, torch.Tensor]) -> np.ndarray:
    return torch.cat([tensors[name].reshape(-1).float() for name, _ in LAYOUT]).numpy()


def logits(params: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Differentiable forward pass of one parameter vector on inputs (n, 64)."""
    p = unflatten(params)
    h = torch.relu(x @ p["W1"] + p["b1"])
    return h @ p["W2"] + p["b2"]


class BatchScorer:
    """Per-example correctness of many parameter vectors on one fixed data split.

    Each candidate costs two GEMMs on buffers that stay in cache (the hidden
    activations of one candidate are 1.5 MB); the biases are folded into the products.
    """

    def __init__(self, split: Split):
        n = len(split.y)
        self.y = torch.from_numpy(split.y)
        self.x1 = torch.cat([torch.from_numpy(split.x), torch.ones(n, 1)], 1).contiguous()
        self.h = torch.empty(n, HIDDEN)

    def correct(self, params: np.ndarray) -> np.ndarray:
        """params (B, 19210) float32 -> (B, n) bool: argmax prediction equals the label."""
        params = np.ascontiguousarray(params, dtype=np.float32)
        if not params.flags.writeable:  # a read-only view from Ray's object store
            params = params.copy()
        p = torch.from_numpy(params)
        if p.ndim == 1:
            p = p[None]
        out = torch.empty(p.shape[0], len(self.y), dtype=torch.bool)
        h = self.h
        for i in range(p.shape[0]):
            torch.mm(self.x1, p[i, :N_L1].view(IN + 1, HIDDEN), out=h)
            h.clamp_(min=0)
            lo = torch.addmm(p[i, N_PARAMS - OUT:], h, p[i, N_L1:N_PARAMS - OUT].view(HIDDEN, OUT))
            torch.eq(lo.argmax(1), self.y, out=out[i])
        return out.numpy()


def random_init(rng: np.random.Generator, std: float = 0.01) -> np.ndarray:
    return (rng.standard_normal(N_PARAMS) * std).astype(np.float32)


def train_expert(init: np.ndarray, split: Split, classes: range, lr: float = 0.003,
                 steps: int = 10) -> np.ndarray:
    """Adam, full batch, on the training examples whose label is in `classes` (the paper's experts)."""
    mask = np.isin(split.y, list(classes))
    x = torch.from_numpy(split.x[mask])
    y = torch.from_numpy(split.y[mask])
    params = torch.tensor(init, dtype=torch.float32, requires_grad=True)
    opt = torch.optim.Adam([params], lr=lr)
    for _ in range(steps):
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(logits(params, x), y)
        loss.backward()
        opt.step()
    return params.detach().numpy().copy()
