"""Listening sockets of a default local run's processes (driver, gcs_server, raylet, workers, agents):
how many are not on loopback (the target is 0). Ray's gRPC servers (gcs_server, raylet, driver,
workers) bind 127.0.0.1 through a dual-stack socket, which `ss` shows as [::ffff:127.0.0.1]:PORT: an
IPv4-mapped loopback address, reachable from this machine only; those are counted apart. Starts the
quickstart with a large budget, samples the sockets a few times during the search, then interrupts it
(Ctrl-C) and checks it exits 130.

    .venv/bin/python bench/ray_listeners.py [--samples 3]
"""
import argparse
import json
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from evomerge.engine.cluster import is_loopback, listeners  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--samples", type=int, default=3)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "run"
        proc = subprocess.Popen([sys.executable, "run.py", "--config", "configs/quickstart.yaml", "--set",
                                 "budget.max_evals=10000000", "--out", str(out), "--no-progress"], cwd=ROOT,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        while not (out / "evals.jsonl").exists() or (out / "evals.jsonl").stat().st_size == 0:
            if proc.poll() is not None:
                raise SystemExit(f"the run ended early: {proc.stderr.read()}")
            time.sleep(0.2)
        seen: dict[tuple, str] = {}
        for _ in range(args.samples):
            for name, ip, port in listeners(proc.pid):
                seen[(ip, port)] = name
            time.sleep(1.0)
        proc.send_signal(signal.SIGINT)
        proc.communicate(timeout=120)
    exposed = sorted(f"{name} {ip}:{port}" for (ip, port), name in seen.items() if not is_loopback(ip))
    mapped = sum(1 for ip, _ in seen if ip.startswith("::ffff:127."))
    result = {"listening_sockets": len(seen), "non_loopback": len(exposed), "exposed": exposed,
              "ipv4_mapped_loopback": mapped,
              "processes": sorted(set(seen.values())), "exit_code_after_ctrl_c": proc.returncode}
    print(json.dumps(result, indent=2))
    (ROOT / "bench" / "results").mkdir(parents=True, exist_ok=True)
    (ROOT / "bench" / "results" / "ray_listeners.json").write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
