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
"""
from __future__ import annotations

import argparse
import json
import random
import string
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from ..errors import UserError
from ..files import save_pretrained

SPECIALS = ["<pad>", "<s>", "</s>", "<unk>"]
ALPHABET = string.ascii_lowercase + string.ascii_uppercase + string.digits + " +=-,:"


# skills ----------------------------------------------------------------------------------------

def _word(rng: random.Random, lo: int = 3, hi: int = 5) -> str:
    return "".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(lo, hi)))


def _add(rng):
    a, b = rng.randint(0, 99), rng.randint(0, 99)
    return f"{a}+{b}=", str(a + b)


def _add_noise(rng, prompt, answer):
    return str(rng.randint(0, 198))


def _reverse(rng):
    w = _word(rng)
    return f"rev {w}=", w[::-1]


def _upper(rng):
    w = _word(rng)
    return f"up {w}=", w.upper()


def _sort(rng):
    w = _word(rng)
    return f"sort {w}=", "".join(sorted(w))


def _copy(rng):
    w = _word(rng)
    return f"copy {w}=", w


def _count(rng):
    w = "".join(rng.choice("abc") for _ in range(rng.randint(3, 6)))
    c = rng.choice("abc")
    return f"count {c} {w}=", str(w.count(c))


def _letters_noise(rng, prompt, answer):
    pool = string.ascii_uppercase if answer.isupper() else string.ascii_lowercase
    return "".join(rng.choice(pool) for _ in answer)


def _count_noise(rng, prompt, answer):
    return str(rng.randint(0, 7))


@dataclass(frozen=True)
class Skill:
    sample: object  # rng -> (prompt, answer)
    noise: object   # rng, prompt, answer -> a random answer of the right shape (pretraining, distractors)


SKILLS: dict[str, Skill] = {
    "add": Skill(_add, _add_noise),
    "reverse": Skill(_reverse, _letters_noise),
    "upper": Skill(_upper, _letters_noise),
    "sort": Skill(_sort, _letters_noise),
    "copy": Skill(_copy, _letters_noise),
    "count": Skill(_count, _count_noise),
}
DEFAULT_SKILLS = {"small": ["upper", "sort", "count"], "tiny": ["upper", "copy"]}


@dataclass(frozen=True)
class Size:
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


# tokenizer -------------------------------------------------------------------------------------

def build_tokenizer(corpus: list[str]):
    """A character-level Hugging Face fast tokenizer: one token per character, BOS prepended.

    The vocabulary is the special tokens, then the fixed ALPHABET, then any other character of the
    corpus (sorted), so it is the same for every seed.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    chars = list(ALPHABET) + sorted({c for line in corpus for c in line} - set(ALPHABET))
    vocab = {t: i for i, t in enumerate(SPECIALS + chars)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", vocab["<s>"])])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>", unk_token="<unk>", model_max_length=64)


# data ------------------------------------------------------------------------------------------

def _task_examples(skill: str, rng: random.Random, n_train: int, n_test: int) -> list[dict]:
    seen, rows = set(), []
    while len(rows) < n_train + n_test:
        prompt, answer = SKILLS[skill].sample(rng)
        if prompt in seen:
            continue
        seen.add(prompt)
        rows.append({"prompt": prompt, "answer": answer, "split": "train" if len(rows) < n_train else "test"})
    return rows


def _mc_examples(skill: str, rows: list[dict], rng: random.Random, n_choices: int = 4) -> list[dict]:
    out = []
    for r in rows:
        choices = [r["answer"]]
        tries = 0
        while len(choices) < n_choices:
            tries += 1
            c = SKILLS[skill].noise(rng, r["prompt"], r["answer"])
            if tries % 2 == 0 and len(r["answer"]) > 1:  # every other distractor: one character changed
                k = rng.randrange(len(r["answer"]))
                c = r["answer"][:k] + c[0] + r["answer"][k + 1:]
            if c not in choices or tries > 100:
                choices.append(c)
        rng.shuffle(choices)
        out.append({"prompt": r["prompt"], "choices": choices, "answer": choices.index(r["answer"]),
                    "split": r["split"]})
    return out


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


LM_EVAL_SPLITS = {"train": "validation", "test": "test"}  # task file split -> lm-eval split


def write_lm_eval_tasks(out: Path, tasks: dict[str, str], prefix: str = "tinylm_") -> dict[str, str]:
    """lm-eval task YAMLs for task files in the lm_tasks format, under `out` (an include_path).

    tasks: {name: JSONL path}; a name ending in ``_mc`` is a choice task (lm-eval multiple_choice,
    summed log-likelihood of each choice after the prompt: metric acc, as lm_tasks' choice), any
    other a generate task (generate_until, greedy, stopped at a newline or the end-of-sequence token,
    at most 8 tokens: metric exact_match). Each file's train examples become split ``validation``
    (searched on; also the few-shot examples), its test examples split ``test`` (held out), as JSONL
    files in ``out/data`` named in the YAMLs by absolute path (so any working directory can load
    them; move the directory and write it again). Returns {lm-eval task name: YAML path}.
    """
    import yaml

    class _Dumper(yaml.SafeDumper):  # strings with a newline double-quoted: "\n"
        pass

    _Dumper.add_representer(str, lambda d, v: d.represent_scalar(
        "tag:yaml.org,2002:str", v, style='"' if "\n" in v else None))
    out = Path(out).resolve()
    written = {}
    for name, path in tasks.items():
        rows = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
        files = {}
        for ours, theirs in LM_EVAL_SPLITS.items():
            split_rows = [{k: v for k, v in r.items() if k != "split"} for r in rows if r["split"] == ours]
            if split_rows:  # a split without examples is left out (lm-eval cannot load an empty file)
                f = out / "data" / f"{name}.{theirs}.jsonl"
                _write_jsonl(f, split_rows)
                files[theirs] = str(f)
        task = prefix + name
        spec = {"task": task, "dataset_path": "json", "dataset_kwargs": {"data_files": files},
                "validation_split": "validation" if "validation" in files else None,
                "test_split": "test" if "test" in files else None,
                "fewshot_split": "validation" if "validation" in files else None,
                "doc_to_text": "prompt", "doc_to_target": "answer", "target_delimiter": ""}
        if name.endswith("_mc"):
            spec.update(output_type="multiple_choice", doc_to_choice="choices",
                        metric_list=[{"metric": m, "aggregation": "mean", "higher_is_better": True}
                                     for m in ("acc", "acc_norm")])
        else:
            spec.update(output_type="generate_until",
                        generation_kwargs={"until": ["\n"], "max_gen_toks": 8, "do_sample": False},
                        metric_list=[{"metric": "exact_match", "aggregation": "mean", "higher_is_better": True}])
        yaml_path = out / f"{task}.yaml"
        yaml_path.write_text(yaml.dump(spec, Dumper=_Dumper, sort_keys=False))
        written[task] = str(yaml_path)
    return written


class _Stream:
    """Training batches: (input_ids, attention_mask, labels) of B sequences '<s>prompt answer</s>'."""

    def __init__(self, tokenizer, sample, rng: random.Random, batch: int, exclude: set[str],
                 answer_only: bool):
        self.tok, self.sample, self.rng, self.batch = tokenizer, sample, rng, batch
        self.exclude, self.answer_only = exclude, answer_only
        self.vocab = tokenizer.get_vocab()

    def next(self):
        import torch

        seqs, starts = [], []
        while len(seqs) < self.batch:
            prompt, answer = self.sample(self.rng)
            if prompt in self.exclude:
                continue
            ids = [self.tok.bos_token_id] + [self.vocab[c] for c in prompt + answer] + [self.tok.eos_token_id]
            seqs.append(ids)
            starts.append(1 + len(prompt))
        width = max(map(len, seqs))
        ids = torch.full((len(seqs), width), self.tok.pad_token_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        labels = torch.full_like(ids, -100)
        for i, (q, s) in enumerate(zip(seqs, starts)):
            ids[i, :len(q)] = torch.tensor(q)
            mask[i, :len(q)] = 1
            first = s if self.answer_only else 1
            labels[i, first:len(q)] = ids[i, first:len(q)]
        return ids, mask, labels


def _train(model, stream: _Stream, steps: int, lr: float, warmup: int = 20, on_step=None) -> float:
    """AdamW over `steps` batches; on_step(k) after step k when given (a progress report)."""
    import torch

    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0, betas=(0.9, 0.98))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * max(0.05, 1 - s / steps))
    loss = torch.tensor(0.0)
    for k in range(steps):
        ids, mask, labels = stream.next()
        # right padding: pads only follow the text and carry no labels, so no mask is needed
        loss = model(input_ids=ids, labels=labels).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if on_step is not None:
            on_step(k + 1)
    model.eval()
    return float(loss.detach())


def _duration(s: float) -> str:
    s = max(0, round(s))
    return f"{s} s" if s < 60 else f"{s // 60} min {s % 60:02d} s"


class _Progress:
    """Progress lines (what is trained, k of n, time so far, a rough time left from the steps/s so far)
    through `say`; a line every `every_s` seconds inside a model's training. Costs a clock read a step."""

    def __init__(self, say, total_steps: int, every_s: float = 15.0):
        self.say, self.total, self.every_s = say, total_steps, every_s
        self.t0 = time.perf_counter()
        self.done_steps, self.train_s = 0, 0.0

    def left(self) -> str:
        if not self.done_steps:
            return ""
        rate = self.train_s / self.done_steps
        return f"; about {_duration((self.total - self.done_steps) * rate)} of training left"

    def model(self, k: int, n: int, what: str, steps: int, label: str | None = None):
        """Report the start of model k of n (`label`: its short name in the lines while it trains);
        returns the on_step callback for its training."""
        self.say(f"zoo: [{k}/{n}] training {what}: {steps} steps ({_duration(time.perf_counter() - self.t0)} "
                 f"so far{self.left()})")
        start = last = time.perf_counter()

        def on_step(i: int):
            nonlocal last
            now = time.perf_counter()
            if i == steps:
                self.done_steps += steps
                self.train_s += now - start
            elif now - last >= self.every_s:
                last = now
                rate = (now - start) / i
                self.say(f"zoo:   {label or what}: step {i}/{steps}, about {_duration((steps - i) * rate)} left for it")
        return on_step


def _mixture(skills: list[str], noisy: bool, correct: float = 0.0, always: frozenset = frozenset()):
    """A sampler over all skills' formats; noisy: answers replaced by random ones of the right shape,
    except for a fraction `correct` of the examples and for the skills in `always`."""
    def sample(rng):
        name = rng.choice(skills)
        prompt, answer = SKILLS[name].sample(rng)
        if noisy and name not in always and not (correct > 0 and rng.random() < correct):
            return prompt, SKILLS[name].noise(rng, prompt, answer)
        return prompt, answer
    return sample


def _replayed(sample, pretrain, replay: float):
    """`sample`, with a fraction `replay` of the examples drawn from the pretraining mixture instead."""
    if replay <= 0:
        return sample
    return lambda rng: pretrain(rng) if rng.random() < replay else sample(rng)


def _shuffled(skills: list[str], k: int = 16):
    """Prompts of the skills with answers permuted within groups of k same-skill examples."""
    buf: list[tuple[str, str]] = []

    def sample(rng):
        if not buf:
            name = rng.choice(skills)
            group = [SKILLS[name].sample(rng) for _ in range(k)]
            answers = [a for _, a in group]
            rng.shuffle(answers)
            buf.extend((p, a) for (p, _), a in zip(group, answers))
        return buf.pop()
    return sample


# the family ------------------------------------------------------------------------------------

def _score(model, tokenizer, fitness) -> dict:
    _, _, train = fitness.evaluate_model(model, tokenizer)
    test = fitness.holdout_model(model, tokenizer)
    return {name[:-len("_accuracy")]: {"train": train[name], "test": test[f"{name[:-len('_accuracy')]}_test_accuracy"]}
            for name in train}


def build_family(out: Path, seed: int = 0, size: str = "small", skills: list[str] | None = None,
                 unrelated: int = 0, threads: int = 1, progress=None) -> dict:
    """Build (and overwrite) a base, one expert per skill and `unrelated` unrelated experts under `out`.

    Trains with `threads` torch threads (restored afterwards): one thread is bitwise reproducible
    and does not collapse when other processes share the cores.

    Returns {"out", "seed", "size", "skills", "base", "experts": {name: dir}, "tasks": {task: file},
    "accuracy": {model: {task: {"train": acc, "test": acc}}}, "seconds"}; also written to
    out/family.json. Tasks are '<skill>' (generate) and '<skill>_mc' (choice) for every skill.
    progress: a callable taking one line (what is being trained, k of n, rough time left), or None.
    """
    import torch

    t0 = time.perf_counter()
    if threads < 1:
        raise UserError(f"--threads {threads}: must be >= 1")
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return _build(Path(out), seed, size, skills, unrelated, t0, progress)
    finally:
        torch.set_num_threads(before)


def _build(out: Path, seed: int, size: str, skills: list[str] | None, unrelated: int, t0: float,
           say=None) -> dict:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.utils import logging as hf_logging

    from evomerge.fitness.lm_tasks import LMTasksFitness, LMTasksFitnessConfig

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
        rows = _task_examples(s, rng, sz.n_train, sz.n_test)
        exclude.update(r["prompt"] for r in rows)
        _write_jsonl(out / "tasks" / f"{s}.jsonl", rows)
        _write_jsonl(out / "tasks" / f"{s}_mc.jsonl", _mc_examples(s, rows, rng))
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
    pretrain = _mixture(list(SKILLS), noisy=True, correct=sz.base_correct, always=outside)
    stream = _Stream(tokenizer, pretrain, random.Random(f"{seed}/base"),
                     sz.batch, exclude, answer_only=False)
    n_models = 1 + len(skills) + unrelated
    total = sz.base_steps + len(skills) * sz.expert_steps + unrelated * sz.unrelated_steps
    prog = _Progress(say or (lambda line: None), total)
    _train(model, stream, sz.base_steps, sz.base_lr,
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
        sample = SKILLS[trained_on].sample if spare else _shuffled(skills)
        plans.append((f"unrelated_{i}", sample, sz.unrelated_steps))
        unrelated_on[f"unrelated_{i}"] = trained_on
    for k, (name, sample, steps) in enumerate(plans, 2):
        torch.manual_seed(seed)
        model.load_state_dict(base_state)
        stream = _Stream(tokenizer, _replayed(sample, pretrain, sz.expert_replay),
                         random.Random(f"{seed}/expert/{name}"), sz.batch, exclude,
                         answer_only=True)
        what = f"expert '{name}'" + (f" (on {unrelated_on[name]})" if name in unrelated_on else "")
        _train(model, stream, steps, sz.expert_lr, on_step=prog.model(k, n_models, what, steps, f"expert '{name}'"))
        save_pretrained(model, tokenizer, out / "experts" / name)
        experts[name] = str(out / "experts" / name)

    # accuracies of every model on every task (train and test splits)
    fcfg = LMTasksFitnessConfig(name="lm_tasks", batch_size=64, tasks=[
        {"name": t, "path": p, "kind": "choice" if t.endswith("_mc") else "generate"} for t, p in tasks.items()])
    fitness = LMTasksFitness(fcfg)
    if say is not None:
        say(f"zoo: scoring {n_models} models on {len(tasks)} tasks ({_duration(time.perf_counter() - t0)} so far)")
    accuracy = {}
    for name, path in [("base", out / "base"), *experts.items()]:
        if name == "base":
            model.load_state_dict(base_state)
        else:
            model = LlamaForCausalLM.from_pretrained(path)
        accuracy[name] = _score(model, tokenizer, fitness)

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


def zoo_main(argv: list[str]) -> int:
    """`run.py zoo tinylm --out DIR [--size small|tiny] [--seed 0] [--skills a,b] [--unrelated K]`."""
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
                          threads=args.threads, progress=lambda line: print(line, file=sys.stderr, flush=True))
    print(format_table(result))
    print(f"built {len(result['experts'])} experts and a base in {result['seconds']:.1f}s under {out} "
          f"(details: {out / 'family.json'})")
    return 0
