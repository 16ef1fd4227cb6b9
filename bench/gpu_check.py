"""GPU path check, for a machine with CUDA: resident model on the GPU, in-place merge, GPU fitness.

    python bench/gpu_check.py [--out DIR] [--big-layers 12]

1. The tiny-LM family (built here), scored by the real FitnessWorker (hf_merge space, lm_tasks
   fitness) once with its resident model on CUDA and once on CPU: the worker's device, seconds per
   candidate, and whether both devices give the same per-example scores for the same candidates.
2. A ~120M-parameter Llama (random weights, built here) with 3 experts: TIES and linear merges
   materialized in place on the GPU, seconds per candidate and GB/s of tensor bytes read + written
   (linear: 3 experts read + 1 written; TIES: base + 3 task vectors read + 1 written), next to the
   GPU's device-to-device copy bandwidth.
Ray is not used (the worker class runs in-process), so this needs torch, transformers, tokenizers,
safetensors, pydantic, numpy, pyyaml, psutil and scikit-learn only. Results go to DIR/gpu_check.json.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from evomerge.config import validate  # noqa: E402
from evomerge.demos.tinylm import build_family  # noqa: E402
from evomerge.engine.worker import FitnessWorker  # noqa: E402


def run_config(base, experts, tasks, cache, device, method="ties"):
    return validate({
        "space": {"name": "hf_merge", "models": {"base": base, "experts": experts}, "method": method,
                  "device": device, "cache_dir": cache},
        "strategy": {"name": "cmaes", "diagonal": True},
        "fitness": {"name": "lm_tasks", "tasks": [
            {"name": t, "path": p, "kind": "choice" if t.endswith("_mc") else "generate", "limit": 64}
            for t, p in tasks.items()]},
    })


def family_check(tmp: Path) -> dict:
    fam = build_family(tmp / "zoo", seed=0, size="tiny", threads=8)
    report = {"family_seconds": fam["seconds"]}
    scores = {}
    for device in ("cuda", "cpu"):
        cfg = run_config(fam["base"], fam["experts"], fam["tasks"], str(tmp / "tv"), device)
        w = FitnessWorker(0, cfg.space, cfg.fitness, 0, threads=8)
        dim = w.space.dim
        xs = np.random.default_rng(0).uniform(w.space.lower, w.space.upper, size=(6, dim)).astype(np.float32)
        w.evaluate(xs[:1])  # warm-up
        out = w.evaluate(xs)
        assert not any(out["errors"]), out["errors"]
        report[device] = {"worker_device": w.ready()["device"], "seconds_per_candidate": out["seconds"] / len(xs),
                          "fitness": [round(float(f), 4) for f in out["fitness"]],
                          "holdout": w.holdout(xs[0])}
        scores[device] = out["scores"]
        if device == "cuda":
            p = next(w.runtime.model.parameters())
            report[device]["resident_param_device"] = str(p.device)
    report["same_scores_cuda_cpu"] = float(np.mean(scores["cuda"] == scores["cpu"]))
    return report


def big_model(tmp: Path, layers: int) -> tuple[str, dict, int]:
    from transformers import LlamaConfig, LlamaForCausalLM

    from tests.hf_models import tokenizer

    tok = tokenizer()
    cfg = LlamaConfig(vocab_size=8192, hidden_size=768, intermediate_size=2048, num_hidden_layers=layers,
                      num_attention_heads=12, num_key_value_heads=12, tie_word_embeddings=False)
    torch.manual_seed(0)
    base = LlamaForCausalLM(cfg)
    base.save_pretrained(tmp / "big_base")
    tok.save_pretrained(tmp / "big_base")
    experts = {}
    for i in range(3):
        with torch.no_grad():
            for p in base.parameters():
                p.add_(torch.randn_like(p) * 0.01)
        base.save_pretrained(tmp / f"big_e{i}")
        tok.save_pretrained(tmp / f"big_e{i}")
        experts[f"e{i}"] = str(tmp / f"big_e{i}")
    n = sum(p.numel() for p in base.parameters())
    return str(tmp / "big_base"), experts, n


def merge_speed(tmp: Path, layers: int) -> dict:
    from evomerge.spaces.hf_merge import HFMergeSpace, HFMergeSpaceConfig

    base, experts, n_params = big_model(tmp, layers)
    buf = torch.empty(256 * 2**20, dtype=torch.float32, device="cuda")
    dst = torch.empty_like(buf)
    dst.copy_(buf)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(20):
        dst.copy_(buf)
    torch.cuda.synchronize()
    copy_gbs = 20 * 2 * buf.numel() * 4 / (time.perf_counter() - t0) / 1e9
    out = {"params": n_params, "device_copy_GBps": round(copy_gbs, 1)}
    model_bytes = n_params * 4
    for method, reads in (("linear", 3), ("ties", 4)):
        space = HFMergeSpace(HFMergeSpaceConfig(name="hf_merge", method=method, device="cuda",
                                                cache_dir=str(tmp / "tv_big"),
                                                models={"base": base, "experts": experts}), 0)
        space.prepare()
        rt = space.open_runtime("cuda")
        xs = np.random.default_rng(1).uniform(space.lower, space.upper, size=(6, space.dim))
        rt.materialize(space.decode(xs[0]))
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for x in xs[1:]:
            rt.materialize(space.decode(x))
        torch.cuda.synchronize()
        per = (time.perf_counter() - t0) / (len(xs) - 1)
        out[method] = {"seconds_per_candidate": round(per, 4),
                       "GBps": round((reads + 1) * model_bytes / per / 1e9, 1)}
        del rt, space
        torch.cuda.empty_cache()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results"))
    ap.add_argument("--big-layers", type=int, default=12)
    args = ap.parse_args()
    assert torch.cuda.is_available(), "this check needs a CUDA GPU"
    report = {"gpu": torch.cuda.get_device_name(0), "torch": torch.__version__}
    with tempfile.TemporaryDirectory() as tmp:
        report["family"] = family_check(Path(tmp))
        print(json.dumps(report, indent=2), flush=True)
        report["merge"] = merge_speed(Path(tmp), args.big_layers)
    print(json.dumps(report["merge"], indent=2))
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "gpu_check.json").write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
