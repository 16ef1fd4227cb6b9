"""Per-tensor task-vector methods: della, della_linear, sce, ram and ramplus_tl (mergekit 0.1.5's semantics;
`tensormerge.TensorMethod`)."""
from __future__ import annotations

from .tensormerge import TensorMethod

TASKVEC: dict[str, type[TensorMethod]] = {}
