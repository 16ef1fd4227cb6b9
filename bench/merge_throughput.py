"""In-place merge throughput (GB/s) of evomerge's linear and TIES merges per candidate, next to memcpy.

    python bench/merge_throughput.py [--hidden 768 --layers 12 --intermediate 2048 --vocab 8192]
                                     [--repeats 3] [--threads N] [--density 0.5 0.7 0.3] [--dtype float32]

Rows: `reference` is merge.merge_tensor per tensor (selection per call, one kernel per operation
per expert: how candidates were merged before the run-level statistics); `eager` / `compiled` are
the search runs' path (kernels.Merger over inputs.MergeInputs, magnitude tables computed once before
timing, as a run does at start-up), with torch ops or torch.compile's fused kernel (compiled once
before timing; the compile time is reported).

A random Llama-shaped state (default ~98M parameters, fp32) is the base; three experts are the
base plus small Gaussian perturbations, and their task vectors (expert - base) are computed once,
before timing. Each candidate merges every tensor in place (`out=`, into the tensors of a
preallocated resident state), with different weights per repeat:

  linear: out = sum_i w_i x_i / sum_i w_i        counted: 3 expert tensors read + 1 written
  TIES:   out = base + elected, trimmed deltas   counted: 3 deltas + base read + 1 written

i.e. the bytes a single fused pass would have to move (the operators' temporaries and TIES'
selection passes are not counted: the GB/s is "useful" bandwidth). The reference is this
machine's memcpy bandwidth in the same run: `dst.copy_(src)` of a large fp32 buffer, counted
as bytes read + written. Results go to bench/results/merge_throughput.json.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from common import write_results  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from evomerge.inputs import MergeInputs  # noqa: E402
from evomerge.kernels import MagnitudeTable, Merger, spec_for  # noqa: E402
from evomerge.merge import merge_tensor  # noqa: E402


def llama_shapes(hidden: int, layers: int, intermediate: int, vocab: int) -> dict:
    """Parameter shapes of a LlamaForCausalLM (untied embeddings, full-width k/v)."""
    shapes = {"model.embed_tokens.weight": (vocab, hidden), "model.norm.weight": (hidden,),
              "lm_head.weight": (vocab, hidden)}
    for i in range(layers):
        p = f"model.layers.{i}."
        for proj in ("q", "k", "v", "o"):
            shapes[p + f"self_attn.{proj}_proj.weight"] = (hidden, hidden)
        shapes[p + "mlp.gate_proj.weight"] = (intermediate, hidden)
        shapes[p + "mlp.up_proj.weight"] = (intermediate, hidden)
        shapes[p + "mlp.down_proj.weight"] = (hidden, intermediate)
        shapes[p + "input_layernorm.weight"] = (hidden,)
        shapes[p + "post_attention_layernorm.weight"] = (hidden,)
    return shapes


def memcpy_gbs(n_bytes: int, repeats: int) -> float:
    src = torch.ones(n_bytes // 4)
    dst = torch.empty_like(src)
    dst.copy_(src)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        dst.copy_(src)
        best = min(best, time.perf_counter() - t0)
    return 2 * src.numel() * 4 / best / 1e9


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--hidden", type=int, default=768)
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--intermediate", type=int, default=2048)
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--repeats", type=int, default=3, help="timed candidates per method (after one warm-up)")
    ap.add_argument("--density", type=float, nargs=3, default=[0.5, 0.7, 0.3], help="TIES densities")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="dtype of the inputs")
    ap.add_argument("--no-reference", action="store_true", help="skip the per-call reference operators")
    ap.add_argument("--memcpy-mb", type=int, default=512, help="memcpy buffer size")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "merge_throughput.json"))
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    gen = torch.Generator().manual_seed(0)
    shapes = llama_shapes(args.hidden, args.layers, args.intermediate, args.vocab)
    base = {k: torch.randn(s, generator=gen) * 0.02 for k, s in shapes.items()}
    experts = [{k: v + 0.01 * torch.randn(v.shape, generator=gen) for k, v in base.items()} for _ in range(3)]
    deltas = [{k: e[k] - base[k] for k in base} for e in experts]  # once, outside the timed loops
    out = {k: torch.empty_like(v) for k, v in base.items()}  # the resident model's tensors
    n_params = sum(v.numel() for v in base.values())
    tensor_bytes = n_params * 4

    cands = [[round(float(x), 3) for x in torch.rand(3, generator=gen) * 0.9 + 0.1] for _ in range(args.repeats + 1)]

    def run(method: str, weights) -> float:
        t0 = time.perf_counter()
        for name, b in base.items():
            if method == "linear":
                merge_tensor("linear", name, b, [e[name] for e in experts], out[name], weights=weights)
            else:
                merge_tensor("ties", name, b, [e[name] for e in experts], out[name], weights=weights,
                             density=args.density, deltas=[d[name] for d in deltas])
        return time.perf_counter() - t0

    dt = getattr(torch, args.dtype)
    tables = {}
    if dt != torch.float32:  # the merge inputs in the model's dtype
        base = {k: v.to(dt) for k, v in base.items()}
        experts = [{k: v.to(dt) for k, v in e.items()} for e in experts]
        deltas = [{k: v.to(dt) for k, v in d.items()} for d in deltas]
        out = {k: torch.empty_like(v) for k, v in base.items()}
    tensor_bytes = n_params * torch.empty((), dtype=dt).element_size()
    t0 = time.perf_counter()
    tables = {k: [MagnitudeTable.of(d[k]) for d in deltas] for k in base}
    table_s = time.perf_counter() - t0
    inputs = {"linear": MergeInputs({k: [e[k] for e in experts] for k in base}, {k: ["device"] * 3 for k in base},
                                    torch.device("cpu"), 64 << 20),
              "ties": MergeInputs({k: [base[k], *[d[k] for d in deltas]] for k in base},
                                  {k: ["device"] * 4 for k in base}, torch.device("cpu"), 64 << 20)}
    outs = {k: v.view(-1) for k, v in out.items()}
    compile_s = {}

    def product(method: str, weights, compiled: bool) -> float:
        key = (method, compiled)
        if key not in mergers:
            t = time.perf_counter()
            mergers[key] = Merger(spec_for(method, 3, None), "cpu", tables if method == "ties" else None,
                                  compiled=compiled)
            mergers[key].run(inputs[method], outs, {k: {"weight": weights, "density": args.density} for k in base})
            compile_s[f"{method}/{'compiled' if compiled else 'eager'}"] = time.perf_counter() - t
        t0 = time.perf_counter()
        mergers[key].run(inputs[method], outs, {k: {"weight": weights, "density": args.density} for k in base})
        return time.perf_counter() - t0

    mergers = {}
    memcpy = memcpy_gbs(args.memcpy_mb << 20, max(5, args.repeats))
    rows = {}
    variants = [("reference", False), ("eager", False), ("compiled", True)]
    if args.no_reference or dt != torch.float32:
        variants = variants[1:]
    for method, moved in (("linear", 4), ("ties", 5)):
        for variant, compiled in variants:
            if variant == "reference":
                run(method, cands[0])  # warm-up
                times = [run(method, w) for w in cands[1:]]
            else:
                times = [product(method, w, compiled) for w in cands[1:]]
            s = sum(times) / len(times)
            gbs = moved * tensor_bytes / s / 1e9
            rows[f"{method}/{variant}"] = {
                "s_per_candidate": s, "times": times, "bytes_counted": moved * tensor_bytes,
                "counted": "3 experts read + 1 written" if method == "linear" else "3 deltas + base read + 1 written",
                "gb_per_s": gbs}
    memcpy_after = memcpy_gbs(args.memcpy_mb << 20, max(5, args.repeats))
    reference = max(memcpy, memcpy_after)  # the fraction is of the faster of the two (the conservative figure)
    for r in rows.values():
        r["fraction_of_memcpy"] = r["gb_per_s"] / reference

    print(f"{n_params / 1e6:.1f}M params {args.dtype} ({tensor_bytes / 1e9:.2f} GB per model), "
          f"{torch.get_num_threads()} torch threads; magnitude tables {table_s:.1f} s (once per run); "
          f"first pass (compile) {', '.join(f'{k} {v:.1f} s' for k, v in compile_s.items())}")
    print(f"memcpy (copy_ of {args.memcpy_mb} MiB, read + write): {memcpy:.2f} GB/s before, "
          f"{memcpy_after:.2f} GB/s after; fractions of {reference:.2f} GB/s")
    print(f"{'method':<19}{'s/candidate':>13}{'GB moved':>10}{'GB/s':>8}{'of memcpy':>11}  counted")
    for m, r in rows.items():
        print(f"{m:<19}{r['s_per_candidate']:>13.3f}{r['bytes_counted'] / 1e9:>10.2f}{r['gb_per_s']:>8.2f}"
              f"{100 * r['fraction_of_memcpy']:>10.0f}%  {r['counted']}")
    report = {"n_params": n_params, "torch_threads": torch.get_num_threads(), "memcpy_gb_per_s": memcpy,
              "memcpy_gb_per_s_after": memcpy_after, "memcpy_reference_gb_per_s": reference, "density": args.density,
              "methods": rows,
              "dtype": args.dtype, "table_s": table_s, "first_pass_s": compile_s,
              "torch": torch.__version__}
    print(f"wrote {write_results(args.out, report)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
