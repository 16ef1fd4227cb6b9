"""The per-tensor merge methods' implementations, by method name (`tensormerge.TensorMethod` subclasses)."""
from __future__ import annotations

from .ops_sphere import SPHERE
from .ops_taskvec import TASKVEC
from .tensormerge import TensorMethod

IMPLEMENTATIONS: dict[str, type[TensorMethod]] = {**SPHERE, **TASKVEC}
