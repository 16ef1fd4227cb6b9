"""evomerge's merge operators against mergekit: parity per method, and time per candidate.

    python bench/merge_parity.py                      # parity on a tiny Llama, then the timing
    python bench/merge_parity.py --skip-timing        # parity only (about half a minute)
    python bench/merge_parity.py --skip-parity --hidden 768 --layers 12 --intermediate 2048 --vocab 8192
    python bench/merge_parity.py --mergekit /path/to/mergekit-yaml

mergekit 0.1.5 is in the dev extra (`pip install -e '.[dev]'`). The executable is `--mergekit`, else
`mergekit-yaml` beside this Python (the venv's), else $EVOMERGE_MERGEKIT_YAML, else `mergekit-yaml` on PATH.

Parity: a tiny LlamaForCausalLM (random init, fixed seed) is the base, three experts are the
base plus different small Gaussian perturbations (so their signs disagree and TIES' sign
election matters); all are saved as fp32 safetensors checkpoints. For each method a mergekit
YAML is written and run with `mergekit-yaml`, and evomerge's `merge_tensor` merges the same
checkpoints tensor by tensor; the largest absolute difference over all tensors is reported.
DARE draws random masks (mergekit's from torch's global generator, evomerge's per tensor),
so for dare_* only the shapes and the mean absolute difference are reported.

Timing: the 3-expert TIES merge of a larger Llama (default hidden 768, 12 layers,
intermediate 2048, vocab 8192: about 98M parameters, fp32). (a) `mergekit-yaml` writes each
candidate to disk (wall time of the whole command); (b) evomerge merges every tensor in place
into a preallocated state (task vectors expert - base computed once, outside the timed loop),
averaged over candidates with different weights. Results go to bench/results/merge_parity.json.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from common import write_results  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from evomerge.merge import merge_tensor  # noqa: E402

EXACT = ("linear", "linear_with_base", "task_arithmetic", "ties", "ties_unnormalized", "slerp",
         "breadcrumbs", "breadcrumbs_ties")
RANDOM = ("dare_linear", "dare_ties")

# candidate parameters of the parity check (one per method)
WEIGHTS = [0.5, 0.3, 0.7]
DENSITY = [0.5, 0.7, 0.3]
GAMMA = [0.01, 0.02, 0.05]
BASE_WEIGHT = 0.2  # linear_with_base: the base listed as a fourth input
SLERP_T = 0.3


def find_mergekit(explicit: str | None = None) -> str | None:
    """The mergekit-yaml executable: explicit, beside sys.executable (the venv's, also when PATH lacks the venv's
    bin, as under `make test`), $EVOMERGE_MERGEKIT_YAML, PATH."""
    for candidate in (explicit, str(Path(sys.executable).parent / "mergekit-yaml"),
                      os.environ.get("EVOMERGE_MERGEKIT_YAML"), shutil.which("mergekit-yaml")):
        if candidate and Path(candidate).is_file() and os.access(candidate, os.X_OK):
            return candidate
    return None


# models ------------------------------------------------------------------------------------

def build_models(root: Path, *, hidden: int = 64, layers: int = 2, intermediate: int = 128, vocab: int = 256,
                 heads: int | None = None, n_experts: int = 3, scale: float = 0.01, seed: int = 0) -> dict:
    """A random Llama base and `n_experts` perturbed copies, saved as fp32 safetensors checkpoints.

    Returns {"base": path, "experts": [paths], "n_params": int}.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    heads = heads or max(1, hidden // 64)
    config = LlamaConfig(hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                         num_attention_heads=heads, num_key_value_heads=heads, vocab_size=vocab,
                         max_position_embeddings=256, tie_word_embeddings=False)
    config.architectures = ["LlamaForCausalLM"]
    torch.manual_seed(seed)
    with torch.no_grad():
        model = LlamaForCausalLM(config).float()
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    del model
    paths = {"base": root / "base", "experts": [root / f"expert{i}" for i in range(n_experts)]}
    gen = torch.Generator().manual_seed(seed + 1)

    def save(path: Path, tensors: dict) -> None:
        path.mkdir(parents=True, exist_ok=True)
        config.save_pretrained(path)
        save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})

    save(paths["base"], state)
    for p in paths["experts"]:
        save(p, {k: v + scale * torch.randn(v.shape, generator=gen) for k, v in state.items()})
    paths["n_params"] = sum(v.numel() for v in state.values())
    return paths


def load_state(path: Path) -> dict:
    state = {}
    for f in sorted(Path(path).glob("*.safetensors")):
        state.update(load_file(str(f)))
    return state


# mergekit ----------------------------------------------------------------------------------

def mergekit_config(method: str, paths: dict, *, weights=WEIGHTS, density=DENSITY, gamma=GAMMA,
                    t: float = SLERP_T) -> dict:
    base, experts = str(paths["base"]), [str(p) for p in paths["experts"]]
    if method == "slerp":
        return {"merge_method": "slerp", "base_model": base,
                "models": [{"model": base}, {"model": experts[0]}],
                "parameters": {"t": t}, "dtype": "float32"}
    if method in ("linear", "linear_with_base"):
        models = [{"model": e, "parameters": {"weight": w}} for e, w in zip(experts, weights)]
        if method == "linear_with_base":
            models.insert(0, {"model": base, "parameters": {"weight": BASE_WEIGHT}})
        return {"merge_method": "linear", "models": models, "parameters": {"normalize": True},
                "dtype": "float32"}
    mk_method, shared = method, {}
    if method == "ties":
        shared = {"normalize": True}
    elif method == "ties_unnormalized":
        mk_method, shared = "ties", {"normalize": False}
    models = []
    for i, e in enumerate(experts):
        params = {"weight": weights[i]}
        if method != "task_arithmetic":
            params["density"] = density[i]
        if method.startswith("breadcrumbs"):
            params["gamma"] = gamma[i]
        models.append({"model": e, "parameters": params})
    cfg = {"merge_method": mk_method, "base_model": base, "models": models, "dtype": "float32"}
    if shared:
        cfg["parameters"] = shared
    return cfg


def _mergekit_argv(config_text: str, out_dir: Path, *flags: str) -> list[str]:
    """Write the config beside `out_dir`; mergekit-yaml's arguments for it (CPU, no tokenizer copy, quiet)."""
    cfg_path = Path(out_dir).with_suffix(".yaml")
    cfg_path.write_text(config_text)
    return [str(cfg_path), str(out_dir), "--no-copy-tokenizer", "--no-cuda", "--quiet", *flags]


def _run_mergekit_process(cmd: list[str]) -> None:
    proc = subprocess.run(cmd, capture_output=True, text=True,
                          env=dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1"))
    if proc.returncode != 0:
        raise RuntimeError(f"mergekit-yaml failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")


def run_mergekit(exe: str, config: dict, out_dir: Path, *, seed: int = 0) -> float:
    """Run `mergekit-yaml` on `config`; returns the wall time of the command in seconds."""
    import yaml

    cmd = [exe, *_mergekit_argv(yaml.safe_dump(config, sort_keys=False), out_dir, "--no-write-model-card",
                                "--random-seed", str(seed))]
    t0 = time.perf_counter()
    _run_mergekit_process(cmd)
    return time.perf_counter() - t0


def run_mergekit_many(exe: str, jobs: list[tuple[dict, Path]], *, seed: int = 0) -> None:
    """`mergekit-yaml` on every (config, out) job, all in one Python process when `exe` is a Python console
    script (importing mergekit alone takes ~8 s): its own command, `mergekit.scripts.run_yaml.main`, called
    once per job; otherwise one process per job. Each job seeds torch's generator with `seed` (mergekit's
    --random-seed: its DARE / DELLA masks are reproducible)."""
    import yaml

    argvs = [_mergekit_argv(yaml.safe_dump(config, sort_keys=False), out_dir, "--random-seed", str(seed))
             for config, out_dir in jobs]
    first = Path(exe).read_bytes()[:512].split(b"\n")[0].decode(errors="replace")
    python = first[2:].strip() if first.startswith("#!") and "python" in first and " " not in first.strip() else None
    if python is None:
        for argv in argvs:
            _run_mergekit_process([exe, *argv])
        return
    _run_mergekit_process([python, "-c", "import json, sys\nfrom mergekit.scripts.run_yaml import main\n"
                                         "for argv in json.loads(sys.argv[1]):\n"
                                         "    main.main(argv, standalone_mode=False)\n", json.dumps(argvs)])


# hf_merge spaces: every method of methods.METHODS, end to end --------------------------------

# (case, method, experts, options, normalize): the parity cases of the hf_merge space on a tiny family, each
# method with the experts it needs (the first `experts` of a, b, c), non-default options where cheap
HF_CASES = [
    ("linear", "linear", 3, {}, None),
    ("task_arithmetic", "task_arithmetic", 3, {}, None),
    ("ties", "ties", 3, {}, None),
    ("ties_unnormalized", "ties", 3, {}, False),
    ("breadcrumbs", "breadcrumbs", 3, {}, None),
    ("breadcrumbs_ties", "breadcrumbs_ties", 3, {}, None),
    ("slerp", "slerp", 1, {}, None),
    ("sce", "sce", 3, {}, None),
    ("ram", "ram", 3, {}, None),
    ("ramplus_tl", "ramplus_tl", 3, {}, None),
    ("model_stock", "model_stock", 3, {}, None),
    ("model_stock_filter_wise", "model_stock", 3, {"filter_wise": True}, None),
    ("nuslerp", "nuslerp", 2, {}, None),
    ("nuslerp_use_base", "nuslerp", 2, {"use_base": True}, None),
    ("nuslerp_row_wise", "nuslerp", 2, {"nuslerp_flatten": False, "nuslerp_row_wise": True}, None),
    ("multislerp", "multislerp", 3, {}, None),
    ("multislerp_use_base", "multislerp", 3, {"use_base": True}, None),
    ("karcher", "karcher", 3, {}, None),
    ("karcher_use_base", "karcher", 3, {"use_base": True}, None),
    ("nearswap", "nearswap", 1, {}, None),
    ("arcee_fusion", "arcee_fusion", 1, {}, None),
]
# random masks (mergekit: torch.bernoulli on its generator; evomerge: a hash of the recipe seed): compared
# statistically, with 3 experts and, so that each expert's mask and rescaling can be read off the merge, with 1
HF_RANDOM_CASES = [
    (f"{case}{suffix}", method, n, options, None)
    for case, method, options in (("dare_ties", "dare_ties", {}), ("dare_linear", "dare_linear", {}),
                                  ("della", "della", {}), ("della_linear", "della_linear", {}),
                                  ("della_norescale", "della", {"rescale": False}))
    for suffix, n in (("", 3), ("_1expert", 1))
]


def hf_space(method: str, base: Path, experts: dict, cache_dir: Path, *, options: dict | None = None,
             normalize: bool | None = None, seed: int = 0, **cfg):
    """An hf_merge space over `base` and `experts` ({label: path}). The methods with nothing to search (ram,
    karcher, model_stock, arcee_fusion) are refused as search spaces by HFMergeSpace; their space is still
    built here (the refusal comes last in its __init__), for the one model they merge."""
    from evomerge.errors import UserError
    from evomerge.methods import METHODS
    from evomerge.spaces.hf_merge import HFMergeSpace, HFMergeSpaceConfig

    config = HFMergeSpaceConfig(name="hf_merge", method=method, cache_dir=str(cache_dir), options=options or {},
                                normalize=normalize, **cfg,
                                models={"base": str(base), "experts": {k: str(v) for k, v in experts.items()}})
    space = HFMergeSpace.__new__(HFMergeSpace)
    try:
        space.__init__(config, seed)
    except UserError:
        if METHODS[method].params:
            raise
        space.runtime = None
    return space


def hf_recipe(space, rng_seed: int) -> dict:
    """The recipe of a uniformly random point of the space."""
    import numpy as np

    return space.decode(np.random.default_rng(rng_seed).uniform(space.lower, space.upper))


def materialized(space, recipe: dict, device: str = "cpu") -> dict:
    """The recipe's merged tensors as the space's runtime materializes them in place (copies)."""
    model = space.open_runtime(device).materialize(recipe)
    return {k: v.detach().clone() for k, v in model.named_parameters()}


# evomerge ----------------------------------------------------------------------------------

def evomerge_kwargs(method: str, *, weights=WEIGHTS, density=DENSITY, gamma=GAMMA, t: float = SLERP_T):
    """(evomerge method, expert selection, merge_tensor keywords) matching `mergekit_config`."""
    if method == "slerp":
        return "slerp", "first", {"t": t}
    if method == "linear":
        return "linear", "experts", {"weights": list(weights), "normalize": True}
    if method == "linear_with_base":  # mergekit's linear weights every listed input, the base included
        return "linear", "base+experts", {"weights": [BASE_WEIGHT, *weights], "normalize": True}
    if method == "task_arithmetic":
        return "task_arithmetic", "experts", {"weights": list(weights)}
    if method == "ties":
        return "ties", "experts", {"weights": list(weights), "density": list(density), "normalize": True}
    if method == "ties_unnormalized":
        return "ties", "experts", {"weights": list(weights), "density": list(density), "normalize": False}
    if method.startswith("breadcrumbs"):
        return method, "experts", {"weights": list(weights), "density": list(density), "gamma": list(gamma)}
    if method.startswith("dare"):
        return method, "experts", {"weights": list(weights), "density": list(density)}
    raise ValueError(method)


def evomerge_merge(method: str, base: dict, experts: list, out: dict, deltas: list | None = None, **params) -> dict:
    """Merge every tensor of `base` / `experts` into the preallocated `out` with evomerge."""
    ev_method, select, kw = evomerge_kwargs(method, **params)
    for name, b in base.items():
        xs = [e[name] for e in experts]
        ds = None
        if select == "first":
            xs = xs[:1]
        elif select == "base+experts":
            xs = [b, *xs]
        elif deltas is not None:
            ds = [d[name] for d in deltas]
        merge_tensor(ev_method, name, b, xs, out[name], deltas=ds, **kw)
    return out


def parity(exe: str, work: Path, methods=EXACT + RANDOM, **model_kw) -> dict:
    """{method: {"max_abs_diff", "mean_abs_diff", "shapes_match", "exact"}} on a tiny model."""
    paths = build_models(work / "models", **model_kw)
    base = load_state(paths["base"])
    experts = [load_state(p) for p in paths["experts"]]
    deltas = [{k: e[k] - base[k] for k in base} for e in experts]
    results = {}
    for method in methods:
        out_dir = work / f"mk_{method}"
        run_mergekit(exe, mergekit_config(method, paths), out_dir)
        theirs = load_state(out_dir)
        ours = evomerge_merge(method, base, experts, {k: torch.empty_like(v) for k, v in base.items()},
                              deltas=deltas)
        assert set(theirs) == set(ours), (method, set(theirs) ^ set(ours))
        shapes = all(theirs[k].shape == ours[k].shape and theirs[k].dtype == ours[k].dtype for k in ours)
        diffs = [(theirs[k].double() - ours[k].double()).abs() for k in ours]
        results[method] = {
            "max_abs_diff": max(float(d.max()) for d in diffs),
            "mean_abs_diff": float(sum(d.sum() for d in diffs) / sum(d.numel() for d in diffs)),
            "shapes_match": shapes,
            "exact": method in EXACT,
        }
    return results


def timing(exe: str, work: Path, *, mergekit_runs: int = 2, candidates: int = 4, threads: int | None = None,
           **model_kw) -> dict:
    """Seconds per 3-expert TIES candidate: mergekit-yaml to disk vs evomerge in memory."""
    t0 = time.perf_counter()
    paths = build_models(work / "models", **model_kw)
    build_s = time.perf_counter() - t0
    rng = torch.Generator().manual_seed(123)
    cands = [[round(float(x), 3) for x in torch.rand(3, generator=rng) * 0.9 + 0.1] for _ in range(candidates)]

    mk_walls = []
    for i in range(mergekit_runs):
        out_dir = work / f"mk_ties_{i}"
        mk_walls.append(run_mergekit(exe, mergekit_config("ties", paths, weights=cands[i % len(cands)]), out_dir))
        shutil.rmtree(out_dir, ignore_errors=True)

    if threads:
        torch.set_num_threads(threads)
    base = load_state(paths["base"])
    experts = [load_state(p) for p in paths["experts"]]
    deltas = [{k: e[k] - base[k] for k in base} for e in experts]  # once per run, not per candidate
    out = {k: torch.empty_like(v) for k, v in base.items()}  # the resident model's tensors
    evomerge_merge("ties", base, experts, out, deltas=deltas, weights=cands[0])  # warm-up
    ev_times = []
    for w in cands:
        t0 = time.perf_counter()
        evomerge_merge("ties", base, experts, out, deltas=deltas, weights=w)
        ev_times.append(time.perf_counter() - t0)
    mk = sum(mk_walls) / len(mk_walls)
    ev = sum(ev_times) / len(ev_times)
    return {"n_params": paths["n_params"], "build_s": build_s, "mergekit_wall_s": mk_walls,
            "mergekit_s_per_candidate": mk, "evomerge_s": ev_times, "evomerge_s_per_candidate": ev,
            "speedup": mk / ev, "candidate_weights": cands, "density": DENSITY,
            "torch_threads": torch.get_num_threads()}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--mergekit", help="mergekit-yaml executable")
    ap.add_argument("--skip-parity", action="store_true")
    ap.add_argument("--skip-timing", action="store_true")
    ap.add_argument("--tiny-hidden", type=int, default=64)
    ap.add_argument("--tiny-layers", type=int, default=2)
    ap.add_argument("--tiny-vocab", type=int, default=256)
    ap.add_argument("--hidden", type=int, default=768)
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--intermediate", type=int, default=2048)
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--mergekit-runs", type=int, default=2)
    ap.add_argument("--candidates", type=int, default=4)
    ap.add_argument("--threads", type=int, default=None, help="torch threads for evomerge (default: torch's)")
    ap.add_argument("--workdir", help="keep models and outputs here (default: a temporary folder)")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "merge_parity.json"))
    args = ap.parse_args(argv)

    exe = find_mergekit(args.mergekit)
    if exe is None:
        print("no mergekit-yaml found (--mergekit, beside this Python, $EVOMERGE_MERGEKIT_YAML, PATH): "
              "install the dev extra: pip install -e '.[dev]'")
        return 2
    report = {"mergekit": exe, "torch": torch.__version__}
    tmp = None
    if args.workdir:
        work = Path(args.workdir)
        work.mkdir(parents=True, exist_ok=True)
    else:
        tmp = tempfile.TemporaryDirectory(prefix="merge_parity_")
        work = Path(tmp.name)
    try:
        if not args.skip_parity:
            res = parity(exe, work / "parity", hidden=args.tiny_hidden, layers=args.tiny_layers,
                         intermediate=2 * args.tiny_hidden, vocab=args.tiny_vocab)
            report["parity"] = res
            print(f"{'method':<20}{'max |diff|':>14}{'mean |diff|':>14}  shapes  parity expected")
            for m, r in res.items():
                print(f"{m:<20}{r['max_abs_diff']:>14.3e}{r['mean_abs_diff']:>14.3e}  "
                      f"{'ok' if r['shapes_match'] else 'BAD':<6}  {'yes' if r['exact'] else 'no (random masks)'}")
        if not args.skip_timing:
            res = timing(exe, work / "timing", mergekit_runs=args.mergekit_runs, candidates=args.candidates,
                         threads=args.threads, hidden=args.hidden, layers=args.layers,
                         intermediate=args.intermediate, vocab=args.vocab)
            report["timing"] = res
            print(f"\nTIES, 3 experts, {res['n_params'] / 1e6:.1f}M params fp32, "
                  f"{res['torch_threads']} torch threads")
            print(f"  mergekit-yaml to disk: {', '.join(f'{s:.2f}' for s in res['mergekit_wall_s'])} s "
                  f"-> {res['mergekit_s_per_candidate']:.2f} s/candidate")
            print(f"  evomerge in memory:    {', '.join(f'{s:.3f}' for s in res['evomerge_s'])} s "
                  f"-> {res['evomerge_s_per_candidate']:.3f} s/candidate")
            print(f"  speedup: {res['speedup']:.1f}x")
    finally:
        if tmp is not None:
            tmp.cleanup()
    print(f"\nwrote {write_results(args.out, report)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
