"""Per-tensor methods on the geometry of the models: nuslerp, multislerp, karcher, model_stock, nearswap and
arcee_fusion (mergekit 0.1.5's semantics; `tensormerge.TensorMethod`)."""
from __future__ import annotations

from .tensormerge import TensorMethod

SPHERE: dict[str, type[TensorMethod]] = {}
