"""Memory plans of a merging worker for real model shapes on real GPU sizes (no weights, no GPU needed).

    .venv/bin/python bench/memory_plan.py [--out bench/results/memory_plan.json]

Config-only model directories (just config.json) are written to a temporary directory for Llama-2-7B,
Llama-3-8B and Qwen2.5-14B (bf16, untied embeddings); evomerge.headers derives their tensors from the
config and plans, for 3 and 8 experts, method ties, delta_dtype auto (bf16 deltas, as the checkpoint),
resident model bf16, default memory settings (budget 90% of the GPU, reserve 10%, slices 64 MiB),
one worker per GPU, a node with 256 GiB of RAM (so a host tier of 128 GiB, half of it):

  GPUs as nvidia-smi reports them: 24564 MiB (24 GB), 49140 MiB (48 GB), 81559 MiB (80 GB),
  143771 MiB (H200, 141 GB).

Transfer times assume 25 GB/s host-to-device (PCIe 4.0 x16, pinned memory); nothing is measured.

Then the real command on real files: a Llama-2-7B base and 8 experts as safetensors files whose
headers are complete and whose data are holes (sparse files: 13.5 GB each as the filesystem sees
them, ~0 on disk), and `python run.py --config ... --dry-run` timed with `space.memory.gpu_gib`
set to a 24 GB card: the plan comes from the headers, without reading weights.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from common import write_results  # noqa: E402
from evomerge.headers import model_tensors  # noqa: E402
from evomerge.memplan import GIB, MIB, MemoryConfig, make_plan  # noqa: E402

MODELS = {
    "Llama-2-7B": dict(architectures=["LlamaForCausalLM"], hidden_size=4096, intermediate_size=11008,
                       num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32, vocab_size=32000,
                       tie_word_embeddings=False, torch_dtype="bfloat16"),
    "Llama-3-8B": dict(architectures=["LlamaForCausalLM"], hidden_size=4096, intermediate_size=14336,
                       num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
                       tie_word_embeddings=False, torch_dtype="bfloat16"),
    "Qwen2.5-14B": dict(architectures=["Qwen2ForCausalLM"], hidden_size=5120, intermediate_size=13824,
                        num_hidden_layers=48, num_attention_heads=40, num_key_value_heads=8, vocab_size=152064,
                        tie_word_embeddings=False, torch_dtype="bfloat16"),
}
EXPECTED_PARAMS = {"Llama-2-7B": 6.74e9, "Llama-3-8B": 8.03e9, "Qwen2.5-14B": 14.77e9}
GPUS = {"24 GB": 24564, "48 GB": 49140, "80 GB": 81559, "141 GB": 143771}  # MiB, as nvidia-smi shows them
EXPERTS = (3, 8)
HOST_RAM = 256 * GIB
H2D_GBPS = 25.0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "memory_plan.json"))
    args = ap.parse_args()
    memory = MemoryConfig(h2d_gbps=H2D_GBPS)
    rows, params = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        for model, cfg in MODELS.items():
            d = Path(tmp) / model
            d.mkdir()
            (d / "config.json").write_text(json.dumps(cfg))
            tensors = model_tensors(d)
            n = sum(_numel(s) for s, _ in tensors.values())
            params[model] = n
            assert abs(n / EXPECTED_PARAMS[model] - 1) < 0.005, (model, n)
            for e in EXPERTS:
                for gpu, mib in GPUS.items():
                    p = make_plan(tensors, method="ties", labels=[f"e{i}" for i in range(e)],
                                  resident_dtype="bfloat16", delta_dtype="auto", device="cuda", memory=memory,
                                  gpu_bytes=mib * MIB, host_bytes=HOST_RAM, workers_per_node=1)
                    rows.append({"model": model, "experts": e, "gpu": gpu, "gpu_mib": mib, "fits": p.fits,
                                 "resident_gib": p.resident / GIB, "inputs_gib": p.inputs_bytes / GIB,
                                 "budget_gib": p.budget / GIB, "reserve_gib": p.reserve / GIB,
                                 "staging_gib": p.staging / GIB,
                                 **{f"{t}_gib": p.bytes_per_tier[t] / GIB for t in ("device", "host", "disk")},
                                 "streamed_gb": p.streamed_bytes / 1e9, "transfer_s": p.transfer_s,
                                 "why": p.why})
    print("parameters: " + ", ".join(f"{m} {n / 1e9:.2f}B ({n:,})" for m, n in params.items()))
    print(f"method ties, bf16 resident model and deltas, default memory settings, one worker per GPU, host tier "
          f"128 GiB (half of 256 GiB RAM); transfer at an assumed {H2D_GBPS:g} GB/s (PCIe 4.0 x16, pinned)")
    head = (f"{'model':<12} {'E':>2} {'GPU':>6} {'fits':>4} {'resident':>8} {'inputs':>7} {'device':>7} "
            f"{'host':>7} {'disk':>7} {'stream GB':>9} {'xfer s':>7}")
    print(head)
    print("-" * len(head))
    for r in rows:
        print(f"{r['model']:<12} {r['experts']:>2} {r['gpu']:>6} {'yes' if r['fits'] else 'no':>4} "
              f"{r['resident_gib']:>8.1f} {r['inputs_gib']:>7.1f} {r['device_gib']:>7.1f} {r['host_gib']:>7.1f} "
              f"{r['disk_gib']:>7.1f} {r['streamed_gb']:>9.1f} {r['transfer_s']:>7.2f}")
    for r in rows:
        if not r["fits"]:
            print(f"{r['model']} x{r['experts']} on {r['gpu']}: {r['why']}")
    out = write_results(args.out, {
        "assumptions": {"method": "ties", "resident_dtype": "bfloat16", "delta_dtype": "auto (bf16)",
                        "host_ram_gib": HOST_RAM / GIB, "host_gib": HOST_RAM / 2 / GIB, "workers_per_gpu": 1,
                        "h2d_gbps": H2D_GBPS, "h2d": "assumed: PCIe 4.0 x16, pinned", "gpu_mib": GPUS,
                        "memory": memory.model_dump()},
        "parameters": params, "plans": rows})
    print(f"wrote {out}")
    dry_run_on_sparse_checkpoints(args.out)


def dry_run_on_sparse_checkpoints(out_path) -> None:
    import struct
    import time

    from common import run_py

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        for name in ["base", *[f"e{i}" for i in range(8)]]:
            d = root / name
            d.mkdir()
            (d / "config.json").write_text(json.dumps({**MODELS["Llama-2-7B"], "model_type": "llama"}))
            header, off = {}, 0
            for t, (shape, dt) in model_tensors(d).items():
                size = _numel(shape) * 2
                header[t] = {"dtype": dt, "shape": list(shape), "data_offsets": [off, off + size]}
                off += size
            raw = json.dumps(header).encode()
            raw += b" " * (-len(raw) % 8)
            with open(d / "model.safetensors", "wb") as f:
                f.write(struct.pack("<Q", len(raw)) + raw)
                f.truncate(8 + len(raw) + off)  # a hole: no data written
        (root / "t.jsonl").write_text(json.dumps({"prompt": "a", "choices": ["b", "c"], "answer": 0}) + "\n")
        experts = ", ".join(f"e{i}: {root / f'e{i}'}" for i in range(8))
        (root / "cfg.yaml").write_text(
            f"seed: 0\nspace:\n  name: hf_merge\n  models:\n    base: {root / 'base'}\n    experts: {{{experts}}}\n"
            f"  method: ties\n  layer_granularity: 4\n"
            f"  memory: {{gpu_gib: {GPUS['24 GB'] / 1024:.2f}, h2d_gbps: {H2D_GBPS}}}\n"
            f"  cache_dir: {root / 'tv'}\nstrategy: {{name: cmaes, popsize: 16}}\n"
            f"fitness: {{name: lm_tasks, tasks: [{{name: t, path: {root / 't.jsonl'}, kind: choice}}]}}\n"
            f"engine: {{workers: 1, gpus_per_worker: 1}}\nbudget: {{max_evals: 100}}\n")
        t0 = time.perf_counter()
        r = run_py("--config", str(root / "cfg.yaml"), "--dry-run", check=False)
        wall = time.perf_counter() - t0
    plan = r.stdout[r.stdout.find("memory plan"):].rstrip().splitlines()
    print(f"\nrun.py --dry-run on a Llama-2-7B base + 8 experts (sparse safetensors, 9 x 13.5 GB), 24 GB GPU: "
          f"exit {r.returncode}, {wall:.1f} s")
    print("\n".join(plan) or r.stderr)
    write_results(out_path, {"dry_run_7b_8_experts_24gb": {"exit": r.returncode, "wall_s": wall, "plan": plan,
                                                            "stderr": r.stderr}}, merge=True)


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


if __name__ == "__main__":
    main()
