"""The real command started in the background, as a user (or a supervisor) starts it; the synthetic search the
engine tests run (in process and through the command)."""
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def start(*args) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "run.py", *args, "--no-progress"], cwd=ROOT, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def synthetic_config(fitness_extra: dict | None = None, engine_extra: dict | None = None, **over) -> dict:
    """The synthetic search of the engine tests, as a config dict; `section__field=value` or `section={...}`
    overrides, after the fitness's and the engine's extra fields."""
    cfg = {"seed": 3, "space": {"name": "synthetic", "dim": 8},
           "strategy": {"name": "m2n2", "archive_size": 8},
           "fitness": {"name": "synthetic", **(fitness_extra or {})},
           "engine": {"workers": 2, "batch_size": 4, **(engine_extra or {}), "checkpoint_every_s": 0.5},
           "budget": {"max_evals": 600}, "progress_every_s": 0.5}
    for key, value in over.items():
        section, _, name = key.partition("__")
        if name:
            cfg[section][name] = value
        else:
            cfg[section] = value
    return cfg
