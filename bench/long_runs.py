"""Long-run figures: utilization, engine overhead, worker faults and driver kills with resume.

    python bench/long_runs.py [--only utilization overhead faults resume] [--seed 0]

Every run is the real command (`python run.py ...`) on the synthetic space and fitness
(evomerge/spaces/synthetic.py, fitness/synthetic.py), whose evaluation time and faults the config sets.
- utilization: log-normal evaluation times (median 50 ms, sigma 1), 8 workers: steady-state M2N2
  (free-running and deterministic), CMA-ES with popsize 8 (overlapping generations, the default, and
  generational, `overlap: 0`), nevergrad (NGOpt) and random search; worker utilization from summary.json.
- overhead: a zero-cost fitness (no sleep, microseconds of numpy) and 16 workers: evaluations/s and
  driver milliseconds per evaluation.
- faults: a deterministic 2,000-evaluation run in which 3 workers are SIGKILLed (by pid, from
  workers.jsonl) at random moments, against the same run without faults.
- resume: a deterministic 2,000-evaluation run whose driver is SIGKILLed at 3 random points and
  resumed each time, against the uninterrupted run.
Results: bench/results/long_runs.json.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from common import ENV, ROOT, run_py, write_results


def config(tmp: Path, name: str, strategy: dict, fitness: dict, engine: dict, budget: dict) -> Path:
    cfg = {"seed": 0, "space": {"name": "synthetic", "dim": 16, "n_seeds": 4},
           "strategy": strategy, "fitness": {"name": "synthetic", **fitness},
           "engine": engine, "budget": budget}
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def run(*args: str) -> dict:
    r = run_py(*args, "--no-progress", check=False)
    if r.returncode != 0:
        raise SystemExit(f"run.py {' '.join(args)} failed:\n{r.stderr}")
    out = Path(args[args.index("--out") + 1] if "--out" in args else args[args.index("--resume") + 1])
    return json.loads((out / "summary.json").read_text())


def start(*args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "run.py", *args, "--no-progress"], cwd=ROOT, env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def count(out: Path) -> int:
    f = out / "evals.jsonl"
    return f.read_bytes().count(b"\n") if f.exists() else 0


def wait_until(out: Path, n: int, proc: subprocess.Popen) -> None:
    while count(out) < n:
        if proc.poll() is not None:
            raise SystemExit(f"the run ended before {n} evaluations:\n{proc.stderr.read()}")
        time.sleep(0.01)


def kill_driver(proc: subprocess.Popen) -> None:
    import psutil

    children = psutil.Process(proc.pid).children(recursive=True)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    _, alive = psutil.wait_procs(children, timeout=30)
    for p in alive:  # only what this bench started
        p.kill()


def evals(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "evals.jsonl").read_text().splitlines()]


def compare(ref: Path, out: Path, n: int) -> dict:
    a, b = evals(ref), evals(out)
    ids = [e["id"] for e in b]
    sa, sb = (json.loads((d / "summary.json").read_text()) for d in (ref, out))
    return {"logged": len(b), "unique_ids": len(set(ids)), "ids_are_0_to_n": sorted(ids) == list(range(n)),
            "same_recipe_sequence": [e["recipe"] for e in a] == [e["recipe"] for e in b],
            "same_fitness_sequence": [e.get("fitness") for e in a] == [e.get("fitness") for e in b],
            "best_ref": [sa["best"]["eval_id"], sa["best"]["fitness"]],
            "best": [sb["best"]["eval_id"], sb["best"]["fitness"]],
            "same_best": sa["best"] == sb["best"]}


def utilization(tmp: Path) -> dict:
    out = {}
    fit = {"delay_ms": 50, "delay_sigma": 1.0}
    engine = {"workers": 8, "cpus_per_worker": 0.25, "batch_size": 1, "queue_depth": 2}
    cases = {
        "m2n2": ({"name": "m2n2", "archive_size": 20}, {}),
        "m2n2_deterministic": ({"name": "m2n2", "archive_size": 20}, {"deterministic": True}),
        "cmaes_popsize8": ({"name": "cmaes", "popsize": 8, "x0": "center"}, {}),  # default overlap: 3
        "cmaes_popsize8_generational": ({"name": "cmaes", "popsize": 8, "x0": "center", "overlap": 0}, {}),
        "nevergrad_ngopt": ({"name": "nevergrad"}, {}),
        "random": ({"name": "random"}, {}),
    }
    for name, (strategy, extra) in cases.items():
        evals = 1000 if name in ("nevergrad_ngopt", "random") else 2000  # steady-state: 1,000 tell enough
        cfg = config(tmp, name, strategy, fit, {**engine, **extra}, {"max_evals": evals})
        s = run("--config", str(cfg), "--out", str(tmp / name))
        out[name] = {k: s[k] for k in ("worker_utilization", "evals_per_second", "search_seconds",
                                       "engine_overhead_ms_per_eval", "driver_cpu_ms_per_eval")}
        print(name, out[name], flush=True)
    return out


def overhead(tmp: Path) -> dict:
    out = {}
    for batch in (1, 16, 64):
        name = f"overhead_b{batch}"
        cfg = config(tmp, name, {"name": "m2n2", "archive_size": 20}, {},
                     {"workers": 16, "cpus_per_worker": 0.125, "batch_size": batch, "queue_depth": 2},
                     {"max_evals": 2000 * batch if batch < 64 else 100_000})
        s = run("--config", str(cfg), "--out", str(tmp / name))
        out[name] = {"evals_per_second": s["evals_per_second"], "ms_per_eval": round(1e3 / s["evals_per_second"], 4),
                     "driver_cpu_ms_per_eval": s["driver_cpu_ms_per_eval"], "evaluations": s["evaluations"],
                     "search_seconds": s["search_seconds"], "worker_utilization": s["worker_utilization"]}
        print(name, out[name], flush=True)
    return out


def deterministic_cfg(tmp: Path, name: str) -> Path:
    return config(tmp, name, {"name": "m2n2", "archive_size": 20}, {"delay_ms": 10, "delay_sigma": 1.0},
                  {"workers": 4, "cpus_per_worker": 0.5, "batch_size": 4, "deterministic": True,
                   "checkpoint_every_s": 2.0}, {"max_evals": 2000})


def faults(tmp: Path, rng: random.Random) -> dict:
    cfg = deterministic_cfg(tmp, "faults")
    run("--config", str(cfg), "--out", str(tmp / "faults_ref"))
    out = tmp / "faults_run"
    proc = start("--config", str(cfg), "--out", str(out))
    points = sorted(rng.sample(range(100, 1900), 3))
    killed = []
    for n in points:
        wait_until(out, n, proc)
        alive = {}
        for line in (out / "workers.jsonl").read_text().splitlines():
            e = json.loads(line)
            if e["event"] == "started":
                alive[e["index"]] = e["pid"]
        w = rng.choice(sorted(alive))
        os.kill(alive[w], signal.SIGKILL)
        killed.append({"at_eval": n, "worker": w, "pid": alive[w]})
        time.sleep(0.5)  # let the engine notice before the next kill
    _, err = proc.communicate()
    if proc.returncode != 0:
        raise SystemExit(err)
    summary = json.loads((out / "summary.json").read_text())
    res = {"killed": killed, "worker_replacements": summary["worker_replacements"], "failed": summary["failed"],
           **compare(tmp / "faults_ref", out, 2000)}
    print("faults", res, flush=True)
    return res


def resume(tmp: Path, rng: random.Random) -> dict:
    cfg = deterministic_cfg(tmp, "resume")
    run("--config", str(cfg), "--out", str(tmp / "resume_ref"))
    out = tmp / "resume_run"
    points = sorted(rng.sample(range(100, 1900), 3))
    proc = start("--config", str(cfg), "--out", str(out))
    for i, n in enumerate(points):
        wait_until(out, n, proc)
        kill_driver(proc)
        if i + 1 < len(points):
            proc = start("--resume", str(out))
    s = run("--resume", str(out))
    res = {"killed_at_evals": points, "sessions": s["sessions"], **compare(tmp / "resume_ref", out, 2000)}
    print("resume", res, flush=True)
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", nargs="*", default=["utilization", "overhead", "faults", "resume"])
    ap.add_argument("--seed", type=int, default=0, help="seed of the kill moments")
    args = ap.parse_args()
    rng = random.Random(args.seed)
    results = {"cpus": os.cpu_count()}
    with tempfile.TemporaryDirectory(prefix="evomerge-long-") as tmp:
        tmp = Path(tmp)
        for part in args.only:
            results[part] = {"utilization": lambda: utilization(tmp), "overhead": lambda: overhead(tmp),
                             "faults": lambda: faults(tmp, rng), "resume": lambda: resume(tmp, rng)}[part]()
    print(f"wrote {write_results(ROOT / 'bench' / 'results' / 'long_runs.json', results, merge=True)}")


if __name__ == "__main__":
    main()
