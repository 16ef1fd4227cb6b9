"""M2N2 coefficient form: bytes per archive member, measured on digits and computed for larger models.

    python bench/m2n2_coefficients.py [--seeds 0 1 2] [--tinylm-evals 400]

1. Measured: the quickstart search (two pretrained digit experts, 10,000 evaluations, `python run.py`)
   with `strategy.form: coefficients` at chunk sizes 1 (every coordinate may be a boundary, as in the
   dense form) and 1024, against the dense form: test accuracy, search seconds, segments per member,
   bytes per member (from summary.json's strategy section).
2. Measured on checkpoints (when zoo/tinylm is built): configs/tinylm_m2n2_mixture.yaml, M2N2's
   coefficient form over the three tiny-LM experts (space hf_mixture, tensor grid): members'
   segments and bytes next to the model's dense size, the seeds' and the best merge's fitness.
3. Computed (nothing loaded beyond safetensors headers): a member of S seeds costs at most
   chunks x (8 + 8 S) bytes (a segment start and S float64 coefficients per segment), with the grid
   at tensor boundaries or at chunks of 2^20 coordinates; the dense form costs 4 bytes per parameter
   (float32; 2 in bfloat16). For the tiny LM (its base's header) and a 1.1B-parameter Llama
   (TinyLlama-1.1B's shapes: 22 layers, hidden 2048, MLP 5632, 4 KV heads of 64, vocab 32000).
Results: bench/results/m2n2_coefficients.json.
"""
from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np

from common import ROOT, run_py, write_results


def llama_tensor_sizes(layers, hidden, mlp, kv_heads, head_dim, vocab) -> list[int]:
    block = [hidden * hidden, kv_heads * head_dim * hidden, kv_heads * head_dim * hidden, hidden * hidden,
             mlp * hidden, mlp * hidden, hidden * mlp, hidden, hidden]
    return [vocab * hidden] + block * layers + [hidden, vocab * hidden]


def header_sizes(path: Path) -> list[int]:
    import struct

    sizes = []
    for f in sorted(path.glob("*.safetensors")):
        with open(f, "rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            head = json.loads(fh.read(n))
        sizes += [int(np.prod(v["shape"])) for k, v in head.items() if k != "__metadata__"]
    return sizes


def computed(name: str, sizes: list[int], seeds: int) -> dict:
    params = sum(sizes)
    seg = 8 + 8 * seeds
    chunks_1m = sum(-(-s // 2**20) for s in sizes)
    return {"model": name, "parameters": params, "tensors": len(sizes), "seeds": seeds,
            "member_bytes_max_tensor_grid": len(sizes) * seg, "member_bytes_max_1M_chunks": chunks_1m * seg,
            "dense_bytes_fp32": 4 * params, "dense_bytes_bf16": 2 * params}


def measured(seeds: list[int]) -> dict:
    tmp = Path(tempfile.mkdtemp(prefix="m2n2-coef-"))
    out = {}
    for label, sets in {"dense": [], "coefficients, chunk 1": ["strategy.form=coefficients"],
                        "coefficients, chunk 1024": ["strategy.form=coefficients", "strategy.chunk_size=1024"]}.items():
        rows = []
        for seed in seeds:
            run = tmp / f"{len(out)}-{seed}"
            run_py("--config", "configs/quickstart.yaml", "--out", str(run), "--no-progress",
                   "--set", f"seed={seed}", *[a for s in sets for a in ("--set", s)])
            s = json.loads((run / "summary.json").read_text())
            st = s["strategy"]
            rows.append({"test_accuracy": s["best"]["holdout"]["test_accuracy"], "search_seconds": s["search_seconds"],
                         "segments_mean": st.get("segments_mean"), "segments_max": st.get("segments_max"),
                         "bytes_per_member": st.get("bytes_per_member_mean", 4 * 19_210)})
        out[label] = {k: (float(np.mean([r[k] for r in rows])) if rows[0][k] is not None else None) for k in rows[0]}
        print(label, json.dumps(out[label]), flush=True)
    return out


def measured_tinylm(evals: int) -> dict:
    run = Path(tempfile.mkdtemp(prefix="m2n2-mixture-")) / "run"
    run_py("--config", "configs/tinylm_m2n2_mixture.yaml", "--out", str(run), "--no-progress",
           "--set", f"budget.max_evals={evals}")
    s = json.loads((run / "summary.json").read_text())
    evals_log = [json.loads(line) for line in (run / "evals.jsonl").read_text().splitlines()]
    seeds = {e["id"]: e["fitness"] for e in evals_log if e["id"] < 3}
    params = sum(header_sizes(ROOT / "zoo" / "tinylm" / "base"))
    st = s["strategy"]
    return {"evaluations": s["evaluations"], "search_seconds": s["search_seconds"],
            "seed_fitness": seeds, "best_fitness": s["best"]["fitness"], "best_holdout": s["best"]["holdout"],
            "segments_mean": st["segments_mean"], "segments_max": st["segments_max"], "cells": st["chunks"],
            "bytes_per_member_mean": st["bytes_per_member_mean"], "dense_bytes_fp32": 4 * params}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", nargs="*", type=int, default=[0, 1, 2])
    ap.add_argument("--tinylm-evals", type=int, default=400)
    ap.add_argument("--skip-digits", action="store_true")
    args = ap.parse_args()
    results = {"measured_digits": {} if args.skip_digits else measured(args.seeds), "computed": []}
    base = ROOT / "zoo" / "tinylm" / "base"
    if base.is_dir():
        results["measured_tinylm"] = measured_tinylm(args.tinylm_evals)
        print("tiny LM, hf_mixture:", json.dumps(results["measured_tinylm"]), flush=True)
        results["computed"].append(computed("tiny LM (zoo)", header_sizes(base), seeds=3))
    results["computed"].append(computed("Llama 1.1B (TinyLlama shapes)",
                                        llama_tensor_sizes(22, 2048, 5632, 4, 64, 32000), seeds=3))
    for row in results["computed"]:
        print(json.dumps(row))
    write_results(ROOT / "bench" / "results" / "m2n2_coefficients.json", results)


if __name__ == "__main__":
    main()
