"""The API fitness's hard budget of requests and tokens, shared by all workers of a run.

Opened once per run session by the engine in the driver (`APIFitness.open_shared`), with what
earlier sessions spent (from the checkpoint): a Ray actor when Ray runs, whose handle every worker
is given, else a local object (in-process use). Its `state()` is what the checkpoint keeps.
"""
from __future__ import annotations

import threading


class Budget:
    """Requests and tokens left; reserve before a request (an upper bound of its tokens), settle after."""

    def __init__(self, max_requests: int | None, max_tokens: int | None, requests: int = 0, tokens: int = 0):
        self.max_requests, self.max_tokens = max_requests, max_tokens
        self.requests, self.tokens = requests, tokens  # spent (by earlier sessions of a resumed run)
        self._lock = threading.Lock()

    def reserve(self, tokens: int) -> bool:
        with self._lock:
            if self.max_requests is not None and self.requests + 1 > self.max_requests:
                return False
            if self.max_tokens is not None and self.tokens + tokens > self.max_tokens:
                return False
            self.requests += 1
            self.tokens += tokens
            return True

    def settle(self, reserved: int, used: int) -> None:
        with self._lock:
            self.tokens += used - reserved

    def spent(self) -> dict:
        return {"requests": self.requests, "tokens": self.tokens}

    state = spent


class RemoteBudget:
    """A Budget living in a Ray actor: the handle travels to the workers with this object."""

    def __init__(self, actor):
        self.actor = actor

    def reserve(self, tokens: int) -> bool:
        import ray

        return ray.get(self.actor.reserve.remote(tokens))

    def settle(self, reserved: int, used: int) -> None:
        self.actor.settle.remote(reserved, used)

    def state(self) -> dict:
        """What has been spent, for the run's checkpoint."""
        import ray

        return ray.get(self.actor.spent.remote())


def open_budget(max_requests: int | None, max_tokens: int | None, spent: dict | None = None,
                remote: bool = True) -> Budget | RemoteBudget | None:
    """The run's budget (None when neither limit is set), starting from `spent`: in a Ray actor when
    `remote` and Ray is initialised, else local."""
    if max_requests is None and max_tokens is None:
        return None
    if remote:
        try:
            import ray

            if ray.is_initialized():
                actor = ray.remote(Budget).options(num_cpus=0).remote(max_requests, max_tokens, **(spent or {}))
                return RemoteBudget(actor)
        except ImportError:
            pass
    return Budget(max_requests, max_tokens, **(spent or {}))
