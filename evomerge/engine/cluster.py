"""The Ray cluster a run uses: a private local instance, reachable from this machine only, or an
existing cluster (``engine.address``).

A local instance listens on loopback only: Ray 2.60 resolves its node address through
``get_node_ip_address``, which gives the machine's external address (and then binds gcs_server, the
raylet, the driver's and every worker's gRPC servers and the agents to it) unless
``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER`` is off, in which case it is 127.0.0.1. Passing
``_node_ip_address="127.0.0.1"`` alone is not enough: ``ray.init`` maps a loopback address back to the
external one. The variable is set in the driver's environment, so every Ray process it starts inherits
it. Ray's token authentication stays as Ray ships it (on for a new local instance).

Each local instance lives in its own temporary directory, which holds ``owner.lock``, locked by the
driver for as long as it lives (an OS lock: it dies with the process, even under SIGKILL). Before a new
instance starts, the directories of earlier instances whose driver is gone are cleaned up: their
surviving processes (found by the ``EVOMERGE_RAY_DIR`` variable they inherited) are ended and the
directory removed.
"""
from __future__ import annotations

import fcntl
import logging
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

from ..errors import UserError

PREFIX = "evomerge-ray-"
OWNER_LOCK = "owner.lock"
MARK = "EVOMERGE_RAY_DIR"  # inherited by every process of a local instance
LOOPBACK_ONLY = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


def _temp_root() -> Path:
    return Path(tempfile.gettempdir())


def _lock(path: Path):
    """An exclusive lock on `path` (created), or None when another process holds it."""
    f = open(path, "a+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        f.close()
        return None
    return f


def clean_stale(root: Path | None = None, min_age_s: float = 60.0) -> list[str]:
    """End the processes of local instances whose driver died and remove their directories.

    An instance whose owner.lock can be taken has no live driver. A directory without owner.lock
    (still being created, or made by an older version) is removed once it is older than `min_age_s`.
    Only processes that carry this instance's directory in their environment are ended.
    Returns the directories removed."""
    import psutil

    removed = []
    for d in sorted((root or _temp_root()).glob(PREFIX + "*")):
        if not d.is_dir() or d.is_symlink():
            continue
        lock_path = d / OWNER_LOCK
        try:
            if not lock_path.exists():
                if time.time() - d.stat().st_mtime < min_age_s:
                    continue
                held = None
            else:
                held = _lock(lock_path)
                if held is None:
                    continue  # its driver is alive
        except OSError:
            continue
        try:
            _end_processes(psutil, str(d))
            shutil.rmtree(d, ignore_errors=True)
            removed.append(str(d))
        finally:
            if held is not None:
                held.close()
    return removed


def _end_processes(psutil, mark: str) -> None:
    me, victims = os.getpid(), []
    for p in psutil.process_iter(["pid", "uids"]):
        if p.pid == me:
            continue
        try:
            if p.environ().get(MARK) == mark:
                victims.append(p)
        except (psutil.Error, OSError):
            continue
    for p in victims:
        try:
            p.terminate()
        except psutil.Error:
            pass
    _, alive = psutil.wait_procs(victims, timeout=3)
    for p in alive:
        try:
            p.kill()
        except psutil.Error:
            pass


def is_loopback(ip: str) -> bool:
    """127.0.0.0/8, ::1, or an IPv4-mapped loopback address ([::ffff:127.0.0.1]: a dual-stack socket
    bound to 127.0.0.1, as gRPC opens them)."""
    import ipaddress

    addr = ipaddress.ip_address(ip.split("%")[0])
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    return addr.is_loopback


def listeners(driver_pid: int) -> list[tuple[str, str, int]]:
    """(process name, address, port) of every listening TCP socket of a run: its driver and every
    process of its local Ray instance (the driver's descendants and whatever carries its MARK)."""
    import psutil

    try:
        driver = psutil.Process(driver_pid)
        procs = {p.pid: p for p in [driver, *driver.children(recursive=True)]}
        marks = {p.environ().get(MARK) for p in procs.values() if p.pid != driver_pid} - {None}
    except psutil.Error:
        return []
    for p in psutil.process_iter():
        try:
            if p.pid not in procs and marks and p.environ().get(MARK) in marks:
                procs[p.pid] = p
        except psutil.Error:
            continue
    found = []
    for p in procs.values():
        try:
            name, conns = p.name(), p.net_connections(kind="inet")
        except psutil.Error:
            continue
        found += [(name, c.laddr.ip, c.laddr.port) for c in conns if c.status == psutil.CONN_LISTEN]
    return found


class RayCluster:
    """A private local Ray instance (loopback only, token auth as Ray ships it, no usage stats, own temp
    dir, cleaned up after a killed predecessor) or an existing cluster."""

    def __init__(self, cfg):
        self.cfg = cfg
        self.temp_dir: str | None = None
        self.owned = False
        self._owner = None

    def __enter__(self) -> "RayCluster":
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        os.environ.setdefault("RAY_DEDUP_LOGS", "0")
        if self.cfg.address == "local":
            os.environ[LOOPBACK_ONLY] = "0"
        import ray

        if ray.is_initialized():  # e.g. a notebook that set Ray up itself
            return self
        if self.cfg.address == "local":
            self._start_local(ray)
        else:
            try:
                ray.init(address=self.cfg.address, logging_level=logging.ERROR)
            except (ConnectionError, RuntimeError, ValueError) as e:
                msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                raise UserError(f"engine.address: cannot join Ray cluster {self.cfg.address!r}: {msg}") from None
        self.owned = True
        return self

    def _start_local(self, ray) -> None:
        import math

        from ray._private import ray_constants

        ray_constants.ENABLE_RAY_CLUSTER = False  # as the variable says, also if Ray was imported before it
        clean_stale()
        self.temp_dir = tempfile.mkdtemp(prefix=PREFIX, dir=_temp_root())
        self._owner = _lock(Path(self.temp_dir) / OWNER_LOCK)
        os.environ[MARK] = self.temp_dir
        need = math.ceil(self.cfg.workers * self.cfg.cpus_per_worker)
        try:
            ray.init(address="local", num_cpus=max(os.cpu_count() or 1, need), include_dashboard=False,
                     _temp_dir=self.temp_dir, _node_ip_address="127.0.0.1",
                     logging_level=logging.ERROR, configure_logging=True)
        except BaseException:
            self.__exit__(*sys.exc_info())
            raise

    def __exit__(self, *exc) -> None:
        import ray

        if self.owned:
            ray.shutdown()
        if self.temp_dir:
            shutil.rmtree(self.temp_dir, ignore_errors=True)
            if os.environ.get(MARK) == self.temp_dir:
                del os.environ[MARK]
            self.temp_dir = None
        if self._owner is not None:
            self._owner.close()
            self._owner = None
