"""Multiple-choice scoring in lm_tasks: the prompt computed once for all its choices (`choice_scoring:
shared_prefix`, the default) against one row per (prompt, choice) pair (`per_choice`).

    python run.py zoo tinylm --out zoo/tinylm        # once, about 4 minutes
    python bench/choice_scoring.py [--zoo zoo/tinylm] [--examples 64] [--prompt-tokens 120] [--repeats 5]
                                   [--batch-size 32] [--threads 1]

The tasks: the zoo's upper_mc, sort_mc and count_mc, the first `--examples` train examples of each
(4 choices each; 192 in all), each prompt made few-shot: solved train examples of the skill's generate
task (others than the example itself) prepended, one a line, until it has `--prompt-tokens` tokens
(about 120), written to temporary JSONL files. The model: the zoo's base (a 4-layer Llama, hidden size 128;
its positions run past the 64 it was trained on, which changes nothing here: both paths see the same
positions). One candidate = one `evaluate_model` over `--examples` examples; per path a warm-up run,
then `--repeats` timed runs, alternating the paths; medians reported. Counted by hooks on the model:
forward tokens (input_ids elements, padding included), real tokens (padding excluded), LM-head
positions (rows of logits). Checked: per-example scores identical and log-likelihoods equal (max
absolute difference reported). Results go to bench/results/choice_scoring.json.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from common import ROOT, write_results  # noqa: E402

sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from evomerge.fitness.lm_tasks import LMTasksFitness, LMTasksFitnessConfig, load_task  # noqa: E402

MODES = ("per_choice", "shared_prefix")
SKILLS = ("upper", "sort", "count")


def few_shot_file(zoo: Path, skill: str, n: int, prompt_tokens: int, tok, out: Path) -> Path:
    """<skill>_mc's first n train examples, each prompt prefixed by solved train examples of <skill> (other
    than itself, one a line) until it has at least `prompt_tokens` tokens."""
    def rows(name):
        return [json.loads(line) for line in (zoo / "tasks" / f"{name}.jsonl").read_text().splitlines() if line.strip()]

    mc = [r for r in rows(f"{skill}_mc") if r["split"] == "train"][:n]
    solved = [f"{r['prompt']}{r['answer']}" for r in rows(skill) if r["split"] == "train"]
    out_rows = []
    for j, r in enumerate(mc):
        prompt, k = r["prompt"], j + 1
        while len(tok(prompt)["input_ids"]) < prompt_tokens:
            shot = solved[k % len(solved)]
            k += 1
            if not shot.startswith(r["prompt"]):
                prompt = shot + "\n" + prompt
        out_rows.append({**r, "prompt": prompt})
    out.write_text("".join(json.dumps(r) + "\n" for r in out_rows))
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--zoo", default="zoo/tinylm")
    ap.add_argument("--examples", type=int, default=64, help="train examples per task (the zoo has 64)")
    ap.add_argument("--prompt-tokens", type=int, default=120)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "choice_scoring.json"))
    args = ap.parse_args(argv)

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(args.threads)
    zoo = (ROOT / args.zoo) if not Path(args.zoo).is_absolute() else Path(args.zoo)
    if not (zoo / "family.json").exists():
        print(f"no zoo at {zoo} (python run.py zoo tinylm --out {args.zoo})", file=sys.stderr)
        return 2
    t_all = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(zoo / "base").eval()
    tok = AutoTokenizer.from_pretrained(zoo / "base")
    tok.model_max_length = 1 << 30  # the few-shot prompts run past the 64 positions it was trained on
    counts = {"forward_tokens": 0, "real_tokens": 0, "lm_head_positions": 0, "forwards": 0}

    def pre(_m, _a, kw):
        ids, mask = kw["input_ids"], kw["attention_mask"]
        counts["forward_tokens"] += ids.numel()
        counts["forwards"] += 1
        if mask.ndim == 2:  # per-choice: the padding mask
            counts["real_tokens"] += int(mask.sum())
        else:  # packed: the padding is pad_token_id
            counts["real_tokens"] += int((ids != tok.pad_token_id).sum())

    def post(_m, _a, _kw, out):
        counts["lm_head_positions"] += out.logits.shape[0] * out.logits.shape[1]

    model.register_forward_pre_hook(pre, with_kwargs=True)
    model.register_forward_hook(post, with_kwargs=True)

    with tempfile.TemporaryDirectory() as tmp:
        tasks = [{"name": f"{s}_mc", "kind": "choice", "path": str(few_shot_file(
            zoo, s, args.examples, args.prompt_tokens, tok, Path(tmp) / f"{s}_mc.jsonl"))} for s in SKILLS]
        fits = {m: LMTasksFitness(LMTasksFitnessConfig(name="lm_tasks", tasks=tasks, batch_size=args.batch_size,
                                                       choice_scoring=m)) for m in MODES}
        splits = [load_task(t, "bench")["train"] for t in fits["per_choice"].cfg.tasks]
        enc = [e for i in range(len(SKILLS)) for e in fits["per_choice"]._encoded(tok, i, "train")]
        prompt_tokens = [len(p) for p, _ in enc]
        choice_tokens = [len(c) for _, cs in enc for c in cs]
        res = {m: {"seconds": []} for m in MODES}
        for m in MODES:  # warm-up, counts, log-likelihoods
            for k in counts:
                counts[k] = 0
            fit, scores, _ = fits[m].evaluate_model(model, tok)
            res[m].update(counts, fitness=fit)
            res[m]["scores"] = scores
            with torch.inference_mode():
                res[m]["ll"] = np.concatenate(fits[m]._choice_loglik(model, enc))
        for r in range(args.repeats):
            for m in (MODES if r % 2 == 0 else MODES[::-1]):
                t0 = time.perf_counter()
                fits[m].evaluate_model(model, tok)
                res[m]["seconds"].append(round(time.perf_counter() - t0, 4))

    a, b = res["per_choice"], res["shared_prefix"]
    same_scores = bool(np.array_equal(a["scores"], b["scores"]))
    max_ll_diff = float(np.abs(a["ll"] - b["ll"]).max())
    for m in MODES:
        res[m]["median_s"] = statistics.median(res[m]["seconds"])
        del res[m]["scores"], res[m]["ll"]
    out = {
        "what": "one lm_tasks evaluate_model (a candidate) on few-shot upper_mc, sort_mc, count_mc: "
                "per_choice vs shared_prefix",
        "command": "python bench/choice_scoring.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "model": str((zoo / "base").relative_to(ROOT) if zoo.is_relative_to(ROOT) else zoo / "base"),
        "tasks": [t["name"] for t in tasks], "examples": sum(len(sp) for sp in splits),
        "choices_per_example": sorted({len(c) for sp in splits for c in sp.choices}),
        "prompt_tokens": {"min": min(prompt_tokens), "median": statistics.median(prompt_tokens),
                          "max": max(prompt_tokens)},
        "choice_tokens": {"min": min(choice_tokens), "median": statistics.median(choice_tokens),
                          "max": max(choice_tokens)},
        "batch_size": args.batch_size, "threads": args.threads, "repeats": args.repeats,
        "per_choice": a, "shared_prefix": b,
        "forward_tokens_ratio": round(a["forward_tokens"] / b["forward_tokens"], 3),
        "real_tokens_ratio": round(a["real_tokens"] / b["real_tokens"], 3),
        "lm_head_positions_ratio": round(a["lm_head_positions"] / b["lm_head_positions"], 3),
        "speedup_median": round(a["median_s"] / b["median_s"], 3),
        "identical_scores": same_scores, "max_abs_loglik_diff": max_ll_diff,
        "bench_seconds": round(time.perf_counter() - t_all, 1),
    }
    write_results(args.out, out)
    print(f"{out['examples']} examples ({', '.join(out['tasks'])}) x 4 choices, "
          f"prompts {out['prompt_tokens']['median']} tokens (median), "
          f"batch_size {args.batch_size}, {args.threads} thread(s), median of {args.repeats}")
    print(f"{'path':<14}{'fwd tokens':>12}{'real tokens':>13}{'LM-head pos':>13}{'forwards':>10}{'median s':>10}")
    for m in MODES:
        r = res[m]
        print(f"{m:<14}{r['forward_tokens']:>12}{r['real_tokens']:>13}{r['lm_head_positions']:>13}"
              f"{r['forwards']:>10}{r['median_s']:>10.3f}")
    print(f"ratios: forward tokens {out['forward_tokens_ratio']}x, real tokens {out['real_tokens_ratio']}x, "
          f"LM-head positions {out['lm_head_positions_ratio']}x, speed {out['speedup_median']}x; "
          f"identical scores: {same_scores}, max |dll| {max_ll_diff:.2e}; {out['bench_seconds']} s in all")
    print(f"wrote {args.out}")
    return 0 if same_scores else 1


if __name__ == "__main__":
    sys.exit(main())
