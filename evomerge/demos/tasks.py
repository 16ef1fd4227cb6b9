"""The tiny-LM family's synthetic string skills (add, reverse, upper, sort, copy, count), the samplers the
trainer draws from (the pretraining mixture, replay, shuffled answers), and the task files: lm_tasks JSONL
(generate and choice examples, train and test splits) and the same tasks as lm-evaluation-harness YAMLs."""
from __future__ import annotations

import json
import random
import string
from dataclasses import dataclass
from pathlib import Path


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

# data ------------------------------------------------------------------------------------------

def task_examples(skill: str, rng: random.Random, n_train: int, n_test: int) -> list[dict]:
    seen, rows = set(), []
    while len(rows) < n_train + n_test:
        prompt, answer = SKILLS[skill].sample(rng)
        if prompt in seen:
            continue
        seen.add(prompt)
        rows.append({"prompt": prompt, "answer": answer, "split": "train" if len(rows) < n_train else "test"})
    return rows


def mc_examples(skill: str, rows: list[dict], rng: random.Random, n_choices: int = 4) -> list[dict]:
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


def write_jsonl(path: Path, rows: list[dict]) -> None:
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
                write_jsonl(f, split_rows)
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




def mixture(skills: list[str], noisy: bool, correct: float = 0.0, always: frozenset = frozenset()):
    """A sampler over all skills' formats; noisy: answers replaced by random ones of the right shape,
    except for a fraction `correct` of the examples and for the skills in `always`."""
    def sample(rng):
        name = rng.choice(skills)
        prompt, answer = SKILLS[name].sample(rng)
        if noisy and name not in always and not (correct > 0 and rng.random() < correct):
            return prompt, SKILLS[name].noise(rng, prompt, answer)
        return prompt, answer
    return sample


def replayed(sample, pretrain, replay: float):
    """`sample`, with a fraction `replay` of the examples drawn from the pretraining mixture instead."""
    if replay <= 0:
        return sample
    return lambda rng: pretrain(rng) if rng.random() < replay else sample(rng)


def shuffled(skills: list[str], k: int = 16):
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
