"""The embedded digits space: every weight of the digits MLP as one vector (the M2N2 paper's task)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import Field

from ..schema import Frozen
from .base import SearchSpace


class DigitsMLPSpaceConfig(Frozen):
    """The digits MLP's 19,210 parameters as one vector."""

    name: Literal["digits_mlp"]
    init: Literal["pretrained", "scratch"] = Field(
        "pretrained", description="seeds: the two pretrained experts (digits 0-4, 5-9) or two random models")
    init_std: float = Field(0.01, gt=0, description="std of the N(0, std^2) initialisation")
    expert_seed: int = Field(42, description="RNG seed of the experts' initialisation "
                                             "(fixed across runs, as in the paper)")
    pretrain_lr: float = Field(0.003, gt=0, description="Adam learning rate of the experts")
    pretrain_steps: int = Field(10, ge=0, description="full-batch Adam steps of each expert")


class DigitsMLPSpace(SearchSpace):
    """The embedded task of the M2N2 paper: every weight of a 64-256-10 MLP on sklearn's 8x8 digits (19,210
    numbers), seeded by two experts (digits 0-4 and 5-9) or two random models."""

    dim = 19_210  # evomerge.demos.digits.N_PARAMS, without importing torch for the config

    def __init__(self, cfg: DigitsMLPSpaceConfig, seed: int):
        self.cfg = cfg
        self.seed = seed
        self.random_seeds = cfg.init == "scratch"

    def seeds(self) -> list[np.ndarray]:
        from ..demos import digits

        if self.cfg.init == "scratch":
            rng = np.random.default_rng([self.seed, 1])  # a stream apart from the strategy's
            return [digits.random_init(rng, self.cfg.init_std) for _ in range(2)]
        train, _ = digits.load()
        rng = np.random.default_rng(self.cfg.expert_seed)
        inits = [digits.random_init(rng, self.cfg.init_std) for _ in range(2)]
        return [digits.train_expert(init, train, classes, self.cfg.pretrain_lr, self.cfg.pretrain_steps)
                for init, classes in zip(inits, (range(0, 5), range(5, 10)))]

    def save(self, x: np.ndarray, directory: Path, info: dict) -> None:
        from ..demos import digits
        from ..files import save_safetensors

        directory.mkdir(parents=True, exist_ok=True)
        tensors = {k: v.contiguous().clone() for k, v in digits.unflatten(np.asarray(x, np.float32)).items()}
        save_safetensors(tensors, directory / "model.safetensors", metadata={"format": "pt", "model": "digits_mlp"})
        (directory / "info.json").write_text(json.dumps(info, indent=2) + "\n")
        (directory / "README.md").write_text(_DIGITS_README)

    def describe(self) -> dict:
        from ..demos import digits

        return {"dim": self.dim, "bounded": False, "layout": [
            {"name": n, "shape": list(s)} for n, s in digits.LAYOUT]}


_DIGITS_README = """# Best digits MLP found by evomerge

`model.safetensors` holds W1 (64x256), b1 (256), W2 (256x10), b2 (10); `info.json` its scores.
The input is the 64 raw pixel values (0..16) of an sklearn 8x8 digit.

```python
from safetensors.torch import load_file
import torch
p = load_file("model.safetensors")
def predict(x):  # x: (n, 64) float32
    return (torch.relu(x @ p["W1"] + p["b1"]) @ p["W2"] + p["b2"]).argmax(1)
```
"""
