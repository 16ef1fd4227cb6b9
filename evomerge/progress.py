"""Progress: a bar on a terminal, plain lines every few seconds otherwise."""
from __future__ import annotations

import sys
import time


class Progress:
    def __init__(self, total: int | None, every_s: float = 5.0, stream=None, enabled: bool = True):
        self.stream = stream or sys.stderr
        self.total = total
        self.every_s = every_s
        self.enabled = enabled
        self.tty = enabled and self.stream.isatty()
        self.bar = None
        self.last = 0.0
        if self.tty:
            from tqdm import tqdm

            self.bar = tqdm(total=total, unit="eval", file=self.stream, dynamic_ncols=True, smoothing=0.1)

    def update(self, done: int, best: float, rate: float, label: str = "best") -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        if now - self.last < (0.2 if self.bar is not None else self.every_s):
            return
        self.last = now
        if self.bar is not None:
            self.bar.n = done
            self.bar.set_postfix_str(f"{label} {best:.4f}", refresh=False)
            self.bar.refresh()
        else:
            self.line(done, best, rate, label)

    def line(self, done: int, best: float, rate: float, label: str = "best") -> None:
        total = f"/{self.total}" if self.total else ""
        print(f"evals {done}{total}  {label} {best:.4f}  {rate_text(rate)} evals/s", file=self.stream, flush=True)

    def close(self, done: int, best: float, rate: float, label: str = "best") -> None:
        if self.bar is not None:
            self.bar.n = done
            self.bar.set_postfix_str(f"{label} {best:.4f}")
            self.bar.close()
        elif self.enabled:
            self.line(done, best, rate, label)


def rate_text(rate: float) -> str:
    """Evaluations per second, readable for fast digits runs and for LLM / API runs alike (1415, 2.4, 0.37)."""
    return f"{rate:.0f}" if rate >= 10 else f"{rate:.2g}"
