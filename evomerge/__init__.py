"""evomerge: search for model merges with evolutionary and black-box optimizers on Ray."""

__version__ = "0.1.0"
