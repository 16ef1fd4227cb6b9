"""Registry of search spaces: add one with a module and a line in SPACES."""
from __future__ import annotations

from .api_weights import APIWeightsSpace, APIWeightsSpaceConfig
from .hf_layers import HFLayersSpace, HFLayersSpaceConfig
from .hf_mixture import HFMixtureSpace, HFMixtureSpaceConfig
from .hf_merge import HFMergeSpace, HFMergeSpaceConfig
from ..schema import Frozen
from .base import SearchSpace
from .digits import DigitsMLPSpace, DigitsMLPSpaceConfig
from .synthetic import SyntheticSpace, SyntheticSpaceConfig

SPACES: dict[str, tuple[type[Frozen], type[SearchSpace]]] = {
    "api_weights": (APIWeightsSpaceConfig, APIWeightsSpace),
    "digits_mlp": (DigitsMLPSpaceConfig, DigitsMLPSpace),
    "hf_layers": (HFLayersSpaceConfig, HFLayersSpace),
    "hf_merge": (HFMergeSpaceConfig, HFMergeSpace),
    "hf_mixture": (HFMixtureSpaceConfig, HFMixtureSpace),
    "synthetic": (SyntheticSpaceConfig, SyntheticSpace),
}


def build_space(cfg: Frozen, seed: int) -> SearchSpace:
    """The space `cfg.name` names; `seed` seeds its random initialisations (random seed points)."""
    return SPACES[cfg.name][1](cfg, seed)
