"""`evomerge serve` in a subprocess, for tests, benchmarks and local searches."""
from __future__ import annotations

import json
import os
import time


class LocalServer:
    """`evomerge serve ARGS` (as `python -m evomerge`, no checkout needed) in a subprocess on a free loopback
    port, up once /health answers (for tests, benchmarks and local searches); a context manager that ends the
    process it started. `cwd` (default: the caller's) is where relative paths in ARGS are read from."""

    def __init__(self, *args: str, env: dict | None = None, python: str | None = None, cwd: str | None = None,
                 start_timeout_s: float = 120.0):
        import socket
        import subprocess
        import sys
        import urllib.request

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.proc = subprocess.Popen([python or sys.executable, "-m", "evomerge", "serve", *args,
                                      "--port", str(self.port)],
                                     cwd=cwd, env={**os.environ, **(env or {})}, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True)
        self.url = f"http://127.0.0.1:{self.port}/v1"
        deadline = time.monotonic() + start_timeout_s
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health", timeout=1)
                return
            except Exception:  # noqa: BLE001 - not up yet
                if self.proc.poll() is not None:
                    raise RuntimeError(f"serve exited: {self.proc.stdout.read()[-2000:]}") from None
                if time.monotonic() > deadline:
                    self.close()
                    raise RuntimeError("serve did not come up") from None
                time.sleep(0.2)

    def health(self) -> dict:
        import urllib.request

        return json.loads(urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health", timeout=10).read())

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except Exception:  # noqa: BLE001 - it would not stop: end it
                self.proc.kill()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
