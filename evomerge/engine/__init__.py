"""The search engine: the loop and its parts (the ledger, the recorder, the worker pool), the start-up
order of a run (factory), and the workers that score candidates (worker.py; Ray actors in RayPool)."""
from .factory import Startup, preflight, search
from .jobs import TIMING_KEYS, candidate_key
from .ledger import Ledger
from .local import InProcessPool, WorkerDeath, WorkerHang
from .loop import Engine
from .pool import WorkerPool
from .ray_pool import RayPool

__all__ = ["Engine", "InProcessPool", "Ledger", "RayPool", "Startup", "TIMING_KEYS", "WorkerDeath", "WorkerHang",
           "WorkerPool", "candidate_key", "preflight", "search"]
