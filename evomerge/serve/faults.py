"""Injected faults of `evomerge serve --chaos RATE`, for testing clients (their retries and backoff)."""
from __future__ import annotations

import threading


class Chaos:
    """Injected faults for testing clients: each POST fails with probability `rate`, as one of a 429,
    a 500, a response slower than the client's timeout, or a 200 with a malformed body."""

    KINDS = ("429", "500", "timeout", "malformed")

    def __init__(self, rate: float, seed: int = 0, timeout_s: float = 5.0):
        import random

        self.rate, self.timeout_s, self.rng = rate, timeout_s, random.Random(seed)
        self.lock = threading.Lock()
        self.counts = {"posts": 0, **{k: 0 for k in self.KINDS}}

    def draw(self) -> str | None:
        with self.lock:
            self.counts["posts"] += 1
            if self.rng.random() >= self.rate:
                return None
            kind = self.rng.choice(self.KINDS)
            self.counts[kind] += 1
            return kind

