"""Does drawing children in batches cost M2N2 accuracy? In-process, no Ray, no timing claims.

    python bench/m2n2_batching.py --batches 1 256 --seeds 0 1 2

Batch 1 is the paper's loop (each child drawn from the archive that holds every earlier
result). Batch b draws b children from one archive state and then inserts their results in
order: the staleness of the engine with 2 workers x queue_depth 2 x batch_size 64 is at
most 256 children, so --batches 256 bounds what the engine's batching can cost.
"""
from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from evomerge.spaces.digits import DigitsMLPSpace, DigitsMLPSpaceConfig
from evomerge.fitness.digits import DigitsFitness, DigitsFitnessConfig
from evomerge.populations import Result, SpaceInfo, build_strategy
from evomerge.populations.m2n2 import M2N2Config

from common import write_results


def run(init: str, batch: int, seed: int, evals: int) -> float:
    space = DigitsMLPSpace(DigitsMLPSpaceConfig(name="digits_mlp", init=init), seed)
    info = SpaceInfo(space.dim, tuple(space.seeds()), random_seeds=space.random_seeds)
    st = build_strategy(M2N2Config(name="m2n2"), info, seed)
    fit = DigitsFitness(DigitsFitnessConfig(name="digits"))
    best, best_x, done = -1.0, None, 0
    while done < evals:
        cands = st.ask(min(batch, evals - done))
        ev = fit.evaluate(np.stack([c.x for c in cands]))
        st.tell([Result(c, float(ev.fitness[i]), ev.scores[i]) for i, c in enumerate(cands)])
        for i, c in enumerate(cands):
            if ev.fitness[i] > best:
                best, best_x = float(ev.fitness[i]), c.x
        done += len(cands)
    return fit.holdout(best_x)["test_accuracy"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--init", default="scratch", choices=["scratch", "pretrained"])
    ap.add_argument("--evals", type=int, default=50_000)
    ap.add_argument("--batches", nargs="*", type=int, default=[1, 256])
    ap.add_argument("--seeds", nargs="*", type=int, default=[0, 1, 2])
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "m2n2_batching.json"))
    args = ap.parse_args()
    torch.set_num_threads(1)
    report = {}
    for b in args.batches:
        t0 = time.perf_counter()
        accs = [run(args.init, b, s, args.evals) for s in args.seeds]
        sd = statistics.stdev(accs) if len(accs) > 1 else 0.0
        report[b] = accs
        print(f"{args.init} batch {b:4d}: test accuracy {statistics.mean(accs):.4f} ± {sd:.4f} "
              f"{[round(a, 4) for a in accs]} ({time.perf_counter() - t0:.0f} s)", flush=True)
    write_results(args.out, {"init": args.init, "evals": args.evals, "test_accuracy": report})


if __name__ == "__main__":
    main()
