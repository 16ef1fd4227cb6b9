"""The search engine: the loop, its worker pool, and the Ray actors that score candidates."""
from .loop import TIMING_KEYS, Engine, candidate_key

__all__ = ["Engine", "TIMING_KEYS", "candidate_key"]
