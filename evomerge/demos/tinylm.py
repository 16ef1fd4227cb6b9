"""A small self-made causal-LM family, built locally in minutes on a CPU: a base and skill experts.

``build_family(out)`` writes::

    out/base/                      LlamaForCausalLM (safetensors) + its character-level tokenizer
    out/experts/<skill>/           the base, fully fine-tuned (AdamW) on one synthetic skill
    out/experts/unrelated_<i>/     (with unrelated=k) the base briefly fine-tuned on a skill outside the
                                   family (or, when none is left, on the skills' prompts with answers
                                   shuffled between examples)
    out/tasks/<skill>.jsonl        {"prompt", "answer", "split"}: greedy generation, exact match
    out/tasks/<skill>_mc.jsonl     {"prompt", "choices", "answer": index, "split"}: log-likelihood choice
    out/lm_eval_tasks/             the same tasks for lm-evaluation-harness (fitness `lm_eval`,
                                   include_path): tinylm_<skill> (generate_until, exact_match) and
                                   tinylm_<skill>_mc (multiple_choice, acc); split validation = the
                                   files' train split, test = their test split (write_lm_eval_tasks)
    out/family.json                what build_family returns: paths, sizes, accuracies, seconds

The base is pretrained on every skill's prompt format with random answers of the right shape, so it
knows the formats but none of the family's skills; each expert learns one skill from the shared base,
which makes task vectors (expert - base) meaningful. For mergeable experts (size small) the base also
learns the skills outside the family with correct answers (copy, reverse, add: shared character
circuits the experts build on), and each expert replays the pretraining mixture for a fraction of its
examples, so it keeps the base's behaviour on the other formats and its task vector stays focused.
Experts never see a prompt of the task files.
Everything is deterministic given ``seed`` (and the number of torch threads).

The skills and task files are in `tasks`, the tokenizer and the training loop in `training`; here, the
model sizes, the build and the `zoo` command.
"""
from __future__ import annotations

import argparse
import json
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from ..errors import UserError
from ..files import save_pretrained
from .tasks import SKILLS, mc_examples, mixture, replayed, shuffled, task_examples, write_jsonl, write_lm_eval_tasks
from .training import Progress, Stream, build_tokenizer, duration, train


DEFAULT_SKILLS = {"small": ["upper", "sort", "count"], "tiny": ["upper", "copy"]}


@dataclass(frozen=True)
class Size:
    """One size of the family: the Llama's shape, the training schedule of the base and the experts, and the
    task files' sizes."""

    hidden: int
    layers: int
    heads: int
    intermediate: int
    batch: int
    base_steps: int
    base_lr: float
    expert_steps: int
    expert_lr: float
    unrelated_steps: int
    n_train: int  # examples per task file, train split (the search split)
    n_test: int
    base_correct: float = 0.0  # fraction of pretraining examples with the correct answer (else random)
    expert_replay: float = 0.0  # fraction of an expert's examples drawn from the pretraining mixture
    base_spare_correct: bool = False  # pretraining: correct answers on the skills outside the family


SIZES = {
    "small": Size(hidden=128, layers=4, heads=4, intermediate=256, batch=64, base_steps=600, base_lr=3e-3,
                  expert_steps=250, expert_lr=2e-3, unrelated_steps=150, n_train=64, n_test=200,
                  expert_replay=0.5, base_spare_correct=True),
    "tiny": Size(hidden=64, layers=2, heads=4, intermediate=128, batch=32, base_steps=120, base_lr=5e-3,
                 expert_steps=250, expert_lr=3e-3, unrelated_steps=40, n_train=32, n_test=32),
}


# the family ------------------------------------------------------------------------------------

def build_family(out: Path, seed: int = 0, size: str = "small", skills: list[str] | None = None,
                 unrelated: int = 0, threads: int = 1, progress=None, scorer=None) -> dict:
    """Build (and overwrite) a base, one expert per skill and `unrelated` unrelated experts under `out`.

    Trains with `threads` torch threads (restored afterwards): one thread is bitwise reproducible
    and does not collapse when other processes share the cores.

    Returns {"out", "seed", "size", "skills", "base", "experts": {name: dir}, "tasks": {task: file},
    "accuracy": {model: {task: {"train": acc, "test": acc}}}, "seconds"}; also written to
    out/family.json. Tasks are '<skill>' (generate) and '<skill>_mc' (choice) for every skill.
    progress: a callable taking one line (what is being trained, k of n, rough time left), or None.
    scorer: what measures the accuracies, `scorer(tasks) -> score(model, tokenizer) -> {task: {"train", "test"}}`
    (the `zoo` command passes evomerge.fitness.lm_tasks.accuracy_scorer; the demos sit below the fitnesses and
    do not import them); None: no scoring, "accuracy" is None.
    """
    import torch

    t0 = time.perf_counter()
    if threads < 1:
        raise UserError(f"--threads {threads}: must be >= 1")
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return _build(Path(out), seed, size, skills, unrelated, t0, progress, scorer)
    finally:
        torch.set_num_threads(before)


def _build(out: Path, seed: int, size: str, skills: list[str] | None, unrelated: int, t0: float,
           say=None, scorer=None) -> dict:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    if size not in SIZES:
        raise UserError(f"--size {size}: expected one of {', '.join(SIZES)}")
    skills = list(skills) if skills else list(DEFAULT_SKILLS[size])
    for s in skills:
        if s not in SKILLS:
            raise UserError(f"--skills {s}: unknown skill; known: {', '.join(SKILLS)}")
    if len(set(skills)) != len(skills):
        raise UserError(f"--skills {','.join(skills)}: each skill at most once")
    if unrelated < 0:
        raise UserError(f"--unrelated {unrelated}: must be >= 0")
    sz = SIZES[size]
    out.mkdir(parents=True, exist_ok=True)

    # task files first: experts never train on their prompts
    tasks: dict[str, str] = {}
    exclude: set[str] = set()
    for i, s in enumerate(skills):
        rng = random.Random(f"{seed}/tasks/{s}")
        rows = task_examples(s, rng, sz.n_train, sz.n_test)
        exclude.update(r["prompt"] for r in rows)
        write_jsonl(out / "tasks" / f"{s}.jsonl", rows)
        write_jsonl(out / "tasks" / f"{s}_mc.jsonl", mc_examples(s, rows, rng))
        tasks[s] = str(out / "tasks" / f"{s}.jsonl")
        tasks[f"{s}_mc"] = str(out / "tasks" / f"{s}_mc.jsonl")
    write_lm_eval_tasks(out / "lm_eval_tasks", tasks)

    tokenizer = build_tokenizer([p + a for s in SKILLS for p, a in
                                 (SKILLS[s].sample(random.Random(k)) for k in range(64))])
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(tokenizer), hidden_size=sz.hidden, intermediate_size=sz.intermediate,
                      num_hidden_layers=sz.layers, num_attention_heads=sz.heads,
                      num_key_value_heads=sz.heads, max_position_embeddings=64, rms_norm_eps=1e-6,
                      tie_word_embeddings=False, bos_token_id=tokenizer.bos_token_id,
                      eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    model = LlamaForCausalLM(cfg)
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id

    # base: every known skill's format, answers random (knows the formats, none of the skills)
    outside = frozenset(s for s in SKILLS if s not in skills) if sz.base_spare_correct else frozenset()
    pretrain = mixture(list(SKILLS), noisy=True, correct=sz.base_correct, always=outside)
    stream = Stream(tokenizer, pretrain, random.Random(f"{seed}/base"),
                     sz.batch, exclude, answer_only=False)
    n_models = 1 + len(skills) + unrelated
    total = sz.base_steps + len(skills) * sz.expert_steps + unrelated * sz.unrelated_steps
    prog = Progress(say or (lambda line: None), total)
    train(model, stream, sz.base_steps, sz.base_lr,
           on_step=prog.model(1, n_models, f"the base (a {sz.layers}-layer Llama, hidden size {sz.hidden}) on "
                              "every skill's format", sz.base_steps, "base"))
    base_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    save_pretrained(model, tokenizer, out / "base")

    experts: dict[str, str] = {}
    unrelated_on: dict[str, str] = {}
    plans = [(s, SKILLS[s].sample, sz.expert_steps) for s in skills]
    # unrelated experts: a skill outside the family where one is left, else shuffled answers
    spare = [s for s in SKILLS if s not in skills]
    for i in range(unrelated):
        trained_on = spare[i % len(spare)] if spare else "shuffled"
        sample = SKILLS[trained_on].sample if spare else shuffled(skills)
        plans.append((f"unrelated_{i}", sample, sz.unrelated_steps))
        unrelated_on[f"unrelated_{i}"] = trained_on
    for k, (name, sample, steps) in enumerate(plans, 2):
        torch.manual_seed(seed)
        model.load_state_dict(base_state)
        stream = Stream(tokenizer, replayed(sample, pretrain, sz.expert_replay),
                         random.Random(f"{seed}/expert/{name}"), sz.batch, exclude,
                         answer_only=True)
        what = f"expert '{name}'" + (f" (on {unrelated_on[name]})" if name in unrelated_on else "")
        train(model, stream, steps, sz.expert_lr, on_step=prog.model(k, n_models, what, steps, f"expert '{name}'"))
        save_pretrained(model, tokenizer, out / "experts" / name)
        experts[name] = str(out / "experts" / name)

    # accuracies of every model on every task (train and test splits)
    accuracy = None
    if scorer is not None:
        score = scorer(tasks)
        if say is not None:
            say(f"zoo: scoring {n_models} models on {len(tasks)} tasks ({duration(time.perf_counter() - t0)} so far)")
        accuracy = {}
        for name, path in [("base", out / "base"), *experts.items()]:
            if name == "base":
                model.load_state_dict(base_state)
            else:
                model = LlamaForCausalLM.from_pretrained(path)
            accuracy[name] = score(model, tokenizer)

    result = {"out": str(out), "seed": seed, "size": size, "skills": skills, "base": str(out / "base"),
              "experts": experts, "unrelated_trained_on": unrelated_on, "tasks": tasks,
              "accuracy": accuracy,
              "seconds": round(time.perf_counter() - t0, 1)}
    (out / "family.json").write_text(json.dumps(result, indent=2) + "\n")
    return result


# CLI -------------------------------------------------------------------------------------------

def format_table(result: dict) -> str:
    """Held-out accuracy of each model (rows) on each task (columns)."""
    tasks = list(result["tasks"])
    w = max(len(m) for m in result["accuracy"]) + 2
    lines = ["held-out accuracy".ljust(w) + "".join(f"{t:>12}" for t in tasks)]
    for m, acc in result["accuracy"].items():
        lines.append(m.ljust(w) + "".join(f"{acc[t]['test']:>12.2f}" for t in tasks))
    return "\n".join(lines)


def zoo_main(argv: list[str], scorer=None) -> int:
    """`run.py zoo tinylm --out DIR [--size small|tiny] [--seed 0] [--skills a,b] [--unrelated K]`; `scorer` as
    build_family's (the command passes the lm_tasks fitness's)."""
    from ..command import prog

    ap = argparse.ArgumentParser(
        prog=prog("zoo"), formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Build a family of small models locally, for the demos and tests (nothing is downloaded).\n"
                    "tinylm: a character-level Llama base pretrained on string-skill formats, and one expert\n"
                    "fine-tuned from it per skill; writes base/, experts/<skill>/ (safetensors + tokenizer),\n"
                    "tasks/<skill>.jsonl (greedy exact match) and <skill>_mc.jsonl (4-way choice), with a\n"
                    "train and a held-out test split, lm_eval_tasks/ (the same tasks as lm-evaluation-harness\n"
                    "YAMLs) and family.json (each model's held-out accuracy). About 4 minutes on 2 cores.",
        epilog=f"example:\n  {prog('zoo')} tinylm --out zoo/tinylm")
    ap.add_argument("family", choices=["tinylm"], help="which family")
    ap.add_argument("--out", required=True, metavar="DIR", help="output directory (new or empty, or --force)")
    ap.add_argument("--size", default="small", choices=list(SIZES), help="model size (default small)")
    ap.add_argument("--seed", type=int, default=0, help="seed of data, initialisation and training")
    ap.add_argument("--skills", default=None,
                    help=f"comma-separated skills, from {','.join(SKILLS)} (default: per size)")
    ap.add_argument("--unrelated", type=int, default=0, help="extra experts trained on a skill outside the family")
    ap.add_argument("--threads", type=int, default=1, help="torch threads while training (default 1)")
    ap.add_argument("--force", action="store_true", help="overwrite a non-empty --out")
    args = ap.parse_args(argv)
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out}: exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not args.force:
        raise UserError(f"--out {out}: not empty (pass --force to overwrite)")
    skills = [s.strip() for s in args.skills.split(",") if s.strip()] if args.skills else None
    result = build_family(out, seed=args.seed, size=args.size, skills=skills, unrelated=args.unrelated,
                          threads=args.threads, progress=lambda line: print(line, file=sys.stderr, flush=True),
                          scorer=scorer)
    if result["accuracy"] is not None:
        print(format_table(result))
    print(f"built {len(result['experts'])} experts and a base in {result['seconds']:.1f}s under {out} "
          f"(details: {out / 'family.json'})")
    return 0
