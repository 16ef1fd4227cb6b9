"""The real command started in the background, as a user (or a supervisor) starts it."""
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def start(*args) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "run.py", *args, "--no-progress"], cwd=ROOT, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
