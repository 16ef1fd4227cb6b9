"""Figure 1: every mergekit 0.1.5 method in evomerge: parity with mergekit-yaml, and seconds per candidate.

    python bench/methods_table.py                 # the full figure: 20 methods, the ~100M-parameter model
    python bench/methods_table.py --quick         # a small model and five methods, to check it works (~2 min)
    python bench/methods_table.py --methods ties,della --candidates 2

Parity (the tiny family of tests/hf_models.py, float32, as tests/test_mergekit_parity.py): for each method an
hf_merge space decodes a random point, its runtime materializes the recipe in place and mergekit-yaml runs the
space's export (`mergekit_config`), all methods in one mergekit process; the max abs difference over every
tensor. dare_* and della* draw random masks (mergekit from torch's generator, evomerge from a hash of the
recipe seed): their difference is the masks', not an error; the tests check them statistically. passthrough:
a layer stack (evomerge.passthrough.stack_layers) against mergekit's passthrough.

Timing (bench/merge_parity.py's timing model: a random Llama, hidden 768, 12 layers, intermediate 2048, vocab
8192, ~98M parameters fp32, three perturbed experts; built once): per method, (a) mergekit-yaml to disk: the
wall time of one command (its start-up included, as a search would pay it per candidate); (b) evomerge: the
hf_merge runtime on CPU (kernel auto), in place in the resident model: `open_s` (load the resident model, write
the task vectors unless an earlier method of the table did (the cache is per model set), compile the
kernel: once per run), `first_s` (the first candidate: per-tensor statistics of
the per-tensor methods, once per run), then the mean over `--candidates` further random candidates.
passthrough: an hf_layers layer path (PathRuntime, no weight copied) where that space exists, else
stack_layers to disk. Results: bench/results/methods_table.json and a markdown table.
"""
from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

import merge_parity as mp
from common import ROOT, write_results

sys.path.insert(0, str(ROOT))
# one process times every method, and each compiles its own kernels (a worker of a real run compiles one method's
# kernel): dynamo's recompile limit per function (8) would otherwise send the later methods to eager
torch._dynamo.config.recompile_limit = 256
torch._dynamo.config.accumulated_recompile_limit = 4096
sys.path.insert(0, str(ROOT / "tests"))

from evomerge.methods import METHODS  # noqa: E402

RANDOM = ("dare_ties", "dare_linear", "della", "della_linear")
ALL = [*METHODS, "passthrough"]
QUICK = ["ties", "della", "nuslerp", "ram", "passthrough"]
EXPERTS = {case: n for case, _, n, _, _ in mp.HF_CASES + mp.HF_RANDOM_CASES}
OPTIONS = {case: (options, normalize) for case, _, _, options, normalize in mp.HF_CASES + mp.HF_RANDOM_CASES}


def n_experts(method: str) -> int:
    return EXPERTS.get(method, 3)


def parity(exe: str, work: Path, methods: list[str]) -> dict:
    """{method: max abs difference against mergekit-yaml} on the tiny family."""
    from hf_models import tiny_family

    from evomerge.passthrough import mergekit_passthrough, stack_layers

    base, fam = tiny_family(work / "family")
    ours, jobs = {}, []
    for i, method in enumerate(methods):
        if method == "passthrough":
            models = {"base": base, "a": fam["a"]}
            slices = [{"model": "base", "layers": [0, 2]}, {"model": "a", "layers": [1, 3]}]
            stack_layers(base, models, slices, work / "passthrough_ours")
            ours[method] = mp.load_state(work / "passthrough_ours")
            jobs.append((method, mergekit_passthrough(models, slices)))
            continue
        options, normalize = OPTIONS.get(method, ({}, None))
        space = mp.hf_space(method, base, dict(list(fam.items())[:n_experts(method)]), work / f"tv_{method}",
                            options=options, normalize=normalize)
        recipe = mp.hf_recipe(space, 3 + i)
        ours[method] = mp.materialized(space, recipe)
        jobs.append((method, space.mergekit_config(recipe)))
    mp.run_mergekit_many(exe, [(config, work / f"mk_{m}") for m, config in jobs])
    out = {}
    for method, _ in jobs:
        theirs = mp.load_state(work / f"mk_{method}")
        out[method] = max(float((theirs[k].double() - ours[method][k].double()).abs().max()) for k in theirs)
    return out


def time_method(exe: str, work: Path, method: str, paths: dict, candidates: int, cache: Path) -> dict:
    """Seconds of one mergekit-yaml run and of evomerge's candidates for one method on the timing model
    (`cache`: the task-vector cache, shared by the methods, as by the runs of one model set)."""
    work.mkdir(parents=True, exist_ok=True)
    labels = [f"e{i}" for i in range(len(paths["experts"]))]
    experts = dict(list(zip(labels, paths["experts"]))[:n_experts(method)])
    if method == "passthrough":
        return time_passthrough(exe, work, paths, experts, candidates)
    options, normalize = OPTIONS.get(method, ({}, None))
    space = mp.hf_space(method, paths["base"], experts, cache, options=options, normalize=normalize)
    recipes = [mp.hf_recipe(space, 100 + i) for i in range(candidates + 1)]
    out_dir = work / f"mk_{method}"
    mk_s = mp.run_mergekit(exe, space.mergekit_config(recipes[1]), out_dir)
    shutil.rmtree(out_dir, ignore_errors=True)
    t0 = time.perf_counter()
    runtime = space.open_runtime("cpu")
    open_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    runtime.materialize(recipes[0])
    first_s = time.perf_counter() - t0
    times = []
    for recipe in recipes[1:]:
        t0 = time.perf_counter()
        runtime.materialize(recipe)
        times.append(time.perf_counter() - t0)
    ev_s = sum(times) / len(times)
    del runtime, space
    return {"mergekit_s": mk_s, "evomerge_open_s": open_s, "evomerge_first_s": first_s, "evomerge_s": times,
            "evomerge_s_per_candidate": ev_s, "speedup": mk_s / ev_s, "experts": len(experts),
            "how": "hf_merge runtime, in place"}


def time_passthrough(exe: str, work: Path, paths: dict, experts: dict, candidates: int) -> dict:
    """passthrough: an hf_layers path (resident layers, no copy) where that space exists, else a layer stack
    written to disk (stack_layers); mergekit: the same path as passthrough slices."""
    try:
        from evomerge.spaces.hf_layers import HFLayersSpace, HFLayersSpaceConfig
    except ImportError:
        HFLayersSpace = None
    if HFLayersSpace is not None:
        import numpy as np

        space = HFLayersSpace(HFLayersSpaceConfig(name="hf_layers", models={
            "base": str(paths["base"]), "experts": {k: str(v) for k, v in experts.items()}}), seed=0)
        recipes = [space.decode(np.random.default_rng(100 + i).uniform(space.lower, space.upper))
                   for i in range(candidates + 1)]
        mk_s = mp.run_mergekit(exe, space.mergekit_config(recipes[1]), work / "mk_passthrough")
        shutil.rmtree(work / "mk_passthrough", ignore_errors=True)
        t0 = time.perf_counter()
        runtime = space.open_runtime("cpu")
        open_s = time.perf_counter() - t0
        how = "hf_layers layer path (resident layers)"

        def one(recipe):
            runtime.materialize(recipe)
    else:
        from evomerge.passthrough import mergekit_passthrough, stack_layers

        models = {"base": paths["base"], **experts}
        depth = 1 + max(int(k.split(".")[2]) for k in mp.load_state(paths["base"]) if k.startswith("model.layers."))
        label = next(iter(experts))
        recipes = [[{"model": "base", "layers": [0, depth // 2 + i % 2]},
                    {"model": label, "layers": [depth // 2 - 1, depth]}] for i in range(candidates + 1)]
        mk_s = mp.run_mergekit(exe, mergekit_passthrough(models, recipes[1]), work / "mk_passthrough")
        shutil.rmtree(work / "mk_passthrough", ignore_errors=True)
        open_s, how = 0.0, "stack_layers to disk"

        def one(slices):
            stack_layers(paths["base"], models, slices, work / "stack")
            shutil.rmtree(work / "stack", ignore_errors=True)
    t0 = time.perf_counter()
    one(recipes[0])
    first_s = time.perf_counter() - t0
    times = []
    for recipe in recipes[1:]:
        t0 = time.perf_counter()
        one(recipe)
        times.append(time.perf_counter() - t0)
    ev_s = sum(times) / len(times)
    return {"mergekit_s": mk_s, "evomerge_open_s": open_s, "evomerge_first_s": first_s, "evomerge_s": times,
            "evomerge_s_per_candidate": ev_s, "speedup": mk_s / ev_s, "experts": len(experts), "how": how}


def table(rows: dict, n_params: int) -> str:
    lines = ["| method | max abs diff vs mergekit 0.1.5 (tiny) | mergekit-yaml s/candidate | evomerge s/candidate "
             "| speed-up | evomerge once per run (open + first candidate), s |",
             "|---|---|---|---|---|---|"]
    for m, r in rows.items():
        diff = r.get("max_abs_diff")
        d = "error" if diff is None else f"{diff:.1e}" + (" (random masks)" if m in RANDOM else "")
        if "mergekit_s" in r:
            lines.append(f"| {m} | {d} | {r['mergekit_s']:.1f} | {r['evomerge_s_per_candidate']:.3f} | "
                         f"{r['speedup']:.0f}x | {r['evomerge_open_s']:.1f} + {r['evomerge_first_s']:.2f} |")
        else:
            lines.append(f"| {m} | {d} | - | - | - | - |")
    return f"Timing model: {n_params / 1e6:.1f}M parameters fp32, {torch.get_num_threads()} torch threads\n\n" + \
        "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="a small model and five methods: checks the bench works")
    ap.add_argument("--methods", help="comma-separated methods (default: all 20; --quick: five)")
    ap.add_argument("--mergekit", help="mergekit-yaml executable")
    ap.add_argument("--candidates", type=int, default=3, help="timed evomerge candidates after the first")
    ap.add_argument("--skip-timing", action="store_true")
    ap.add_argument("--workdir", help="keep models and outputs here (default: a temporary folder)")
    ap.add_argument("--out", default=None, help="default bench/results/methods_table.json (--quick: "
                                                 "methods_table_quick.json)")
    args = ap.parse_args(argv)
    exe = mp.find_mergekit(args.mergekit)
    if exe is None:
        print("no mergekit-yaml found: install the dev extra: pip install -e '.[dev]'")
        return 2
    methods = args.methods.split(",") if args.methods else (QUICK if args.quick else ALL)
    unknown = [m for m in methods if m not in ALL]
    if unknown:
        ap.error(f"unknown methods {unknown}; known: {', '.join(ALL)}")
    size = (dict(hidden=128, layers=2, intermediate=256, vocab=1024) if args.quick else
            dict(hidden=768, layers=12, intermediate=2048, vocab=8192))
    out_path = Path(args.out) if args.out else ROOT / "bench" / "results" / (
        "methods_table_quick.json" if args.quick else "methods_table.json")
    tmp = None
    if args.workdir:
        work = Path(args.workdir)
        work.mkdir(parents=True, exist_ok=True)
    else:
        tmp = tempfile.TemporaryDirectory(prefix="methods_table_")
        work = Path(tmp.name)
    t_start = time.perf_counter()
    rows = {m: {} for m in methods}
    report = {"mergekit": exe, "torch": torch.__version__, "model": size, "candidates": args.candidates,
              "quick": args.quick, "rows": rows}
    try:
        for m, d in parity(exe, work / "parity", methods).items():
            rows[m]["max_abs_diff"] = d
        n_params = 0
        if not args.skip_timing:
            t0 = time.perf_counter()
            paths = mp.build_models(work / "models", **size)
            from hf_models import tokenizer

            tok = tokenizer()  # the runtimes load the base's tokenizer (the merge never uses it)
            for p in [paths["base"], *paths["experts"]]:
                tok.save_pretrained(p)
            report["build_s"], n_params = time.perf_counter() - t0, paths["n_params"]
            report["n_params"] = n_params
            for m in methods:
                rows[m].update(time_method(exe, work / f"t_{m}", m, paths, args.candidates, work / "task_vectors"))
                shutil.rmtree(work / f"t_{m}", ignore_errors=True)
                r = rows[m]
                print(f"{m}: mergekit {r['mergekit_s']:.1f} s, evomerge {r['evomerge_s_per_candidate']:.3f} s "
                      f"({r['speedup']:.0f}x)", flush=True)
    finally:
        if tmp is not None:
            tmp.cleanup()
    report["total_s"] = time.perf_counter() - t_start
    print(table(rows, n_params))
    print(f"\nwrote {write_results(out_path, report)} ({report['total_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
