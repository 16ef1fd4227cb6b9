"""One worker merging a Llama with 8 experts under a memory cap: peak memory, merge / transfer / score
seconds per candidate, and merge bandwidth against the device copy (resident) or host-to-device (streaming).

    python bench/gpu_scale.py                      # on a GPU: ~3B bf16 Llama, 8 experts, worker capped at 24 GB
    python bench/gpu_scale.py --small --cap-gb 0.5 # the same path on CPU with a ~30M model (a try-out)

The model is built in memory with random weights (no checkpoint on disk: 9 x 6 GB would not fit the
device machine's disk); experts are the base plus small perturbations and their task vectors (expert
- base, bf16) sit in pinned host memory. The worker's memory plan (`memplan.make_plan`, for the cap)
places them: what does not fit beside the resident model and the reserve streams through
`inputs.MergeInputs` in double-buffered slices, and `kernels.Merger` merges each candidate (TIES:
magnitude tables computed once before timing). On CUDA the process's memory is capped with
`torch.cuda.set_per_process_memory_fraction`. Score: one batched forward pass (batch x seq tokens)
per candidate. Results go to bench/results/gpu_scale.json.
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
from evomerge.memplan import MemoryConfig, make_plan  # noqa: E402

GIB = 1 << 30


def build(args, device):
    from transformers import LlamaConfig, LlamaForCausalLM

    shape = dict(hidden_size=768, intermediate_size=2048, num_hidden_layers=4, num_attention_heads=12,
                 num_key_value_heads=4, vocab_size=8192) if args.small else \
        dict(hidden_size=3072, intermediate_size=8192, num_hidden_layers=28, num_attention_heads=24,
             num_key_value_heads=8, vocab_size=32000)
    cfg = LlamaConfig(**shape, max_position_embeddings=4096, tie_word_embeddings=False)
    with torch.device(device):
        model = LlamaForCausalLM(cfg).to(torch.bfloat16).eval()
    names = [n for n, p in model.named_parameters()]
    params = dict(model.named_parameters())
    pin = device.type == "cuda"
    g = torch.Generator(device).manual_seed(0)
    base = {n: params[n].detach().to("cpu").pin_memory() if pin else params[n].detach().clone() for n in names}
    deltas = []
    for _ in range(args.experts):
        d = {}
        for n in names:
            x = (torch.randn(params[n].shape, generator=g, device=device) * 0.002).to(torch.bfloat16)
            d[n] = x.to("cpu").pin_memory() if pin else x
        deltas.append(d)
    return model, names, base, deltas


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--small", action="store_true", help="a ~30M-parameter model (CPU try-out)")
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--cap-gb", type=float, default=24.0, help="the worker's memory (GiB): plan budget and CUDA cap")
    ap.add_argument("--candidates", type=int, default=3, help="timed candidates per method (after one warm-up)")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--kernel", default="compiled", choices=["compiled", "eager"])
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "gpu_scale.json"))
    args = ap.parse_args(argv)
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    if cuda:
        total = torch.cuda.get_device_properties(device).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, args.cap_gb * GIB / total), device)
    t0 = time.perf_counter()
    model, names, base, deltas = build(args, device)
    build_s = time.perf_counter() - t0
    n_params = sum(base[n].numel() for n in names)
    shapes = {n: (tuple(base[n].shape), "BF16") for n in names}
    labels = [f"e{i}" for i in range(args.experts)]
    memory = MemoryConfig(budget_gib=args.cap_gb, reserve_gib=None if cuda else 0.0)
    rows = {}
    for method in ("linear", "ties"):
        plan = make_plan(shapes, method=method, labels=labels, resident_dtype="bfloat16", delta_dtype="bfloat16",
                         device=device.type, memory=memory, gpu_bytes=int(args.cap_gb * GIB) if cuda else None)
        if not plan.fits:
            rows[method] = {"fits": False, "why": plan.why}
            print(f"{method}: {plan.why}")
            continue
        if method == "linear":  # the experts themselves: base + delta, in the model's dtype
            sources = {n: [(base[n].float() + d[n].float()).to(torch.bfloat16) for d in deltas] for n in names}
            kinds = [("expert", lbl) for lbl in labels]
        else:
            sources = {n: [base[n], *[d[n] for d in deltas]] for n in names}
            kinds = [("base", "base"), *[("delta", lbl) for lbl in labels]]
        tiers = {n: [plan.tier(k, lbl, n) for k, lbl in kinds] for n in names}
        t0 = time.perf_counter()
        inputs = MergeInputs(sources, tiers, device, memory.slice_mib << 20)
        tables = {n: [MagnitudeTable.of(d[n]) for d in deltas] for n in names} if method == "ties" else None
        setup_s = time.perf_counter() - t0
        merger = Merger(spec_for(method, args.experts, None), device, tables, compiled=args.kernel == "compiled")
        outs = {n: p.data.view(-1) for n, p in model.named_parameters()}
        tokens = torch.randint(0, model.config.vocab_size, (args.batch, args.seq), device=device)
        gen = torch.Generator().manual_seed(1)

        def candidate():
            w = [round(float(x), 3) for x in torch.rand(args.experts, generator=gen) * 0.9 + 0.1]
            group = {"weight": w, "density": [0.5] * args.experts}
            t = time.perf_counter()
            merger.run(inputs, outs, {n: group for n in names})
            if cuda:
                torch.cuda.synchronize()
            merge_s = time.perf_counter() - t
            t = time.perf_counter()
            with torch.no_grad():
                model(tokens).logits[:, -1].float().log_softmax(-1)
            if cuda:
                torch.cuda.synchronize()
            return merge_s, inputs.transfer_s or 0.0, time.perf_counter() - t

        if cuda:
            torch.cuda.reset_peak_memory_stats(device)
        t0 = time.perf_counter()
        candidate()  # warm-up (compiles)
        first_s = time.perf_counter() - t0
        times = [candidate() for _ in range(args.candidates)]
        merge_s = sum(t[0] for t in times) / len(times)
        transfer_s = sum(t[1] for t in times) / len(times)
        score_s = sum(t[2] for t in times) / len(times)
        moved = sum(t.numel() * t.element_size() for n in names for t in sources[n]) + n_params * 2  # read + write
        ref_name, ref = reference_bandwidth(device, cuda, plan.streamed_bytes > 0)
        rows[method] = {
            "fits": True, "plan": plan.lines(), "tiers_gib": {k: v / GIB for k, v in plan.bytes_per_tier.items()},
            "streamed_gb": plan.streamed_bytes / 1e9, "setup_s": setup_s, "first_candidate_s": first_s,
            "merge_s": merge_s, "transfer_s": transfer_s, "score_s": score_s,
            "tokens_per_s": args.batch * args.seq / score_s,
            "merge_gb_per_s": moved / merge_s / 1e9,
            "streamed_gb_per_s": plan.streamed_bytes / merge_s / 1e9 if plan.streamed_bytes else None,
            "reference": ref_name, "reference_gb_per_s": ref,
            "fraction": (plan.streamed_bytes / merge_s / 1e9 if plan.streamed_bytes else moved / merge_s / 1e9) / ref,
            "peak_gib": torch.cuda.max_memory_allocated(device) / GIB if cuda else None}
        r = rows[method]
        peak = "-" if r["peak_gib"] is None else f"{r['peak_gib']:.1f} GiB"
        print(f"{method}: merge {merge_s:.3f} s (transfer {transfer_s:.3f} s overlapped), score {score_s:.3f} s "
              f"({r['tokens_per_s']:.0f} tokens/s), streamed {r['streamed_gb']:.1f} GB, "
              f"{100 * r['fraction']:.0f}% of {ref_name} ({ref:.1f} GB/s), peak {peak}")
        inputs = sources = None  # freed before the next method
    report = {"device": torch.cuda.get_device_name(device) if cuda else "cpu", "params": n_params,
              "experts": args.experts, "cap_gib": args.cap_gb, "build_s": build_s, "kernel": args.kernel,
              "methods": rows, "torch": torch.__version__}
    print(f"{n_params / 1e9:.2f}B parameters bf16, {args.experts} experts; wrote {write_results(args.out, report)}")
    return 0


def reference_bandwidth(device, cuda: bool, streaming: bool) -> tuple[str, float]:
    """GB/s of a device copy (read + write) or, when streaming, of a pinned host-to-device copy."""
    n = 256 << 20
    if streaming and cuda:
        src = torch.empty(n, dtype=torch.uint8, pin_memory=True)
        dst = torch.empty(n, dtype=torch.uint8, device=device)
        name, moved = "host-to-device copy", n
    else:
        src = torch.empty(n, dtype=torch.uint8, device=device)
        dst = torch.empty_like(src)
        name, moved = "device copy" if cuda else "memcpy", 2 * n
    best = float("inf")
    for _ in range(5):
        if cuda:
            torch.cuda.synchronize()
        t = time.perf_counter()
        dst.copy_(src, non_blocking=True)
        if cuda:
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t)
    return name, moved / best / 1e9


if __name__ == "__main__":
    sys.exit(main())
