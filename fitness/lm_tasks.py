"""Causal-LM tasks from JSONL: greedy exact match ("generate") or log-likelihood choice ("choice").

Each JSONL line is one example with a ``split`` of ``"train"`` (searched on) or ``"test"`` (held out):

* generate: ``{"prompt": "rev abc=", "answer": "cba", "split": "train"}``; the model decodes greedily
  up to ``max_new_tokens``; the output is cut at the end-of-sequence token and at the first newline,
  stripped, and compared with ``str(answer).strip()``.
* choice: ``{"prompt": "12+7=", "choices": ["19", "18"], "answer": 0, "split": "test"}``; the pick is
  the choice whose tokens, appended to the prompt, have the highest summed log-likelihood.

Per-example scores (0/1) on the train split are concatenated over tasks in config order; the fitness
is the weight-averaged per-task accuracy.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import Field, model_validator

from evomerge.errors import UserError
from evomerge.files import read_utf8
from evomerge.schema import Frozen

from .base import Fitness


class TaskSpec(Frozen):
    name: str = Field(..., min_length=1, description="task name; metrics are '<name>_accuracy' and "
                                                     "'<name>_test_accuracy'")
    path: str = Field(..., description="JSONL file, one example a line, each with a 'split' of "
                                       "'train' or 'test'")
    kind: Literal["generate", "choice"] = Field(..., description="'generate': greedy decoding, exact "
                                                                 "match with 'answer'; 'choice': argmax "
                                                                 "of the log-likelihood over 'choices'")
    weight: float = Field(1.0, gt=0, description="weight of this task's accuracy in the fitness")
    limit: int | None = Field(None, ge=1, description="use only the first N train examples")
    max_new_tokens: int = Field(8, ge=1, description="tokens decoded per prompt (generate tasks)")


class LMTasksFitnessConfig(Frozen):
    name: Literal["lm_tasks"]
    tasks: list[TaskSpec] = Field(..., min_length=1, description="the tasks, scored in this order")
    batch_size: int = Field(32, ge=1, description="prompts (generate) or prompt-choice pairs "
                                                  "(choice) per forward pass")

    @model_validator(mode="after")
    def _unique_names(self):
        check_unique_names(self.tasks)
        return self


def check_unique_names(tasks: list[TaskSpec]) -> None:
    names = [t.name for t in tasks]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ValueError(f"task names must be unique; repeated: {', '.join(dup)}")


@dataclass
class _Split:
    prompts: list[str] = field(default_factory=list)
    answers: list = field(default_factory=list)  # str (generate) or int index (choice)
    choices: list[list[str]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.prompts)


def read_jsonl(path: str | Path, where: str) -> list[tuple[int, dict]]:
    """The JSON objects of a JSONL file, with their line numbers (blank lines skipped); UserError naming
    `where` (the config field), the file and the line for a missing, unreadable, non-UTF-8 or empty
    file, a byte-order mark, a line that is not JSON or not an object."""
    p = Path(path)
    text = read_utf8(p, f"{where}: ", "JSONL file", bom=False)
    rows = []
    for no, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            ex = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"{where}: {p} line {no}: invalid JSON: {e.msg} (column {e.colno})") from None
        if not isinstance(ex, dict):
            raise UserError(f"{where}: {p} line {no}: expected a JSON object, got {_json_type(ex)}")
        rows.append((no, ex))
    if not rows:
        raise UserError(f"{where}: {p}: empty file (expected one JSON object a line)")
    return rows


def _json_type(v) -> str:
    return {list: "an array", str: "a string", bool: "a boolean", type(None): "null"}.get(
        type(v), "a number")


def load_task(spec: TaskSpec, where: str) -> dict[str, _Split]:
    """Read one JSONL task file into {'train': _Split, 'test': _Split}; UserError on any defect."""
    p = Path(spec.path)
    splits = {"train": _Split(), "test": _Split()}
    for no, ex in read_jsonl(p, where):

        def bad(msg: str):
            raise UserError(f"{where}: {p} line {no}: {msg}")

        for key in ("prompt", "answer", "split"):
            if key not in ex:
                bad(f"missing '{key}'")
        if not isinstance(ex["prompt"], str):
            bad(f"'prompt' must be a string, not {_json_type(ex['prompt'])}")
        if not ex["prompt"].strip():
            bad("'prompt' is empty")
        split = ex["split"]
        if split not in splits:
            bad(f"'split' must be 'train' or 'test' (got {split!r})")
        s = splits[split]
        if spec.kind == "generate":
            ans = ex["answer"]
            if isinstance(ans, bool) or not isinstance(ans, (str, int, float)):
                bad(f"'answer' must be a string or a number, not {_json_type(ans)}")
            s.prompts.append(ex["prompt"])
            s.answers.append(str(ans).strip())
            s.choices.append([])
        else:
            if "choices" not in ex:
                bad("missing 'choices' (a choice task)")
            ch = ex["choices"]
            if not isinstance(ch, list) or len(ch) < 2 or not all(isinstance(c, str) and c for c in ch):
                bad("'choices' must be a list of at least 2 non-empty strings")
            ans = ex["answer"]
            if isinstance(ans, bool) or not isinstance(ans, int) or not 0 <= ans < len(ch):
                bad(f"'answer' must be the index of the right choice, 0..{len(ch) - 1} (got {ans!r})")
            s.prompts.append(ex["prompt"])
            s.answers.append(ans)
            s.choices.append(list(ch))
    if not splits["train"]:
        raise UserError(f"{where}: {p}: no examples with \"split\": \"train\" (only test examples: nothing "
                        "to search on)")
    if spec.limit is not None:
        t = splits["train"]
        splits["train"] = _Split(t.prompts[:spec.limit], t.answers[:spec.limit], t.choices[:spec.limit])
    return splits


def load_tasks(tasks: list[TaskSpec]) -> list[dict[str, _Split]]:
    """Every task of a config, each refused by its field (fitness.tasks[i].path) on any defect."""
    return [load_task(t, f"fitness.tasks[{i}].path") for i, t in enumerate(tasks)]


class LMTasksFitness(Fitness):
    input = "model"
    spaces = ("hf_merge", "hf_mixture")
    differentiable = True  # loss_model: the answers' NLL

    @classmethod
    def objectives(cls, cfg: LMTasksFitnessConfig) -> list[str]:
        return [f"{t.name}_accuracy" for t in cfg.tasks] if len(cfg.tasks) > 1 else []

    @classmethod
    def check(cls, cfg: LMTasksFitnessConfig) -> None:
        """In the driver before Ray starts: every task file reads (the workers read them again, once each)."""
        load_tasks(cfg.tasks)

    def __init__(self, cfg: LMTasksFitnessConfig, shared=None):
        super().__init__(cfg, shared)
        self.data = load_tasks(cfg.tasks)  # once per worker
        self._tok = None  # the tokenizer the cached encodings belong to (held, so its id stays unique)
        self._enc: dict = {}

    # scoring ---------------------------------------------------------------------------------

    def evaluate_model(self, model, tokenizer) -> tuple[float, np.ndarray, dict[str, float]]:
        accs, scores = self._run(model, tokenizer, "train")
        metrics = {f"{t.name}_accuracy": a for t, a in zip(self.cfg.tasks, accs)}
        w = np.array([t.weight for t in self.cfg.tasks], dtype=np.float64)
        fitness = float(np.dot(w, accs) / w.sum())
        return fitness, np.concatenate(scores).astype(np.float32), metrics

    def holdout_model(self, model, tokenizer) -> dict[str, float]:
        accs, _ = self._run(model, tokenizer, "test")
        return {f"{t.name}_test_accuracy": a for t, a, d in zip(self.cfg.tasks, accs, self.data)
                if len(d["test"])}

    def loss_model(self, model, tokenizer):
        """Differentiable search-split loss: per task, the mean over examples of the mean negative
        log-likelihood of the answer tokens (generate: the answer; choice: the right choice) after
        the prompt; tasks weighted as in the fitness. A torch scalar with its autograd graph."""
        total, wsum = None, 0.0
        for i, (spec, data) in enumerate(zip(self.cfg.tasks, self.data)):
            s = data["train"]
            if not len(s):
                continue
            enc = self._encoded(tokenizer, i, "train")
            if spec.kind == "generate":
                answers = tokenizer(list(s.answers), add_special_tokens=False)["input_ids"]
                pairs = [(p, list(a)) for p, a in zip(enc, answers)]
            else:
                pairs, k = [], 0
                for j, ch in enumerate(s.choices):
                    pairs.append((enc[k + s.answers[j]][1], enc[k + s.answers[j]][2]))
                    k += len(ch)
            nll = self._answer_nll(model, pairs)
            total = spec.weight * nll if total is None else total + spec.weight * nll
            wsum += spec.weight
        return total / wsum

    def _answer_nll(self, model, pairs: list[tuple[list[int], list[int]]]):
        """Mean over pairs of the mean NLL of the continuation tokens given the prompt (with grad)."""
        import torch

        per_example = []
        bs = self.cfg.batch_size
        for start in range(0, len(pairs), bs):
            chunk = pairs[start:start + bs]
            seqs = [p + c for p, c in chunk]
            width = max(len(q) for q in seqs)
            ids = torch.zeros((len(chunk), width), dtype=torch.long)
            mask = torch.zeros((len(chunk), width), dtype=torch.long)
            labels = torch.full((len(chunk), width), -100, dtype=torch.long)
            for k, ((p, c), q) in enumerate(zip(chunk, seqs)):  # right padding
                ids[k, :len(q)] = torch.tensor(q, dtype=torch.long)
                mask[k, :len(q)] = 1
                labels[k, len(p):len(q)] = torch.tensor(c, dtype=torch.long)
            dev = model.device
            logits = model(input_ids=ids.to(dev), attention_mask=mask.to(dev), use_cache=False).logits
            lp = torch.log_softmax(logits[:, :-1].to(torch.promote_types(logits.dtype, torch.float32)), dim=-1)
            tgt = labels[:, 1:].to(dev)
            keep = tgt != -100
            tok = lp.gather(2, tgt.clamp(min=0)[..., None])[..., 0] * keep
            per_example.append(-(tok.sum(1) / keep.sum(1).clamp(min=1)))
        return torch.cat(per_example).mean()

    def _run(self, model, tokenizer, split: str) -> tuple[list[float], list[np.ndarray]]:
        import torch

        if model.training:
            model.eval()
        accs, scores = [], []
        with torch.inference_mode():
            for i, (spec, data) in enumerate(zip(self.cfg.tasks, self.data)):
                s = data[split]
                if not len(s):
                    accs.append(float("nan"))
                    scores.append(np.zeros(0, dtype=np.float32))
                    continue
                enc = self._encoded(tokenizer, i, split)
                if spec.kind == "generate":
                    correct = self._generate(model, tokenizer, enc, s, spec.max_new_tokens)
                else:
                    correct = self._choose(model, enc, s)
                scores.append(correct.astype(np.float32))
                accs.append(float(correct.mean()))
        return accs, scores

    def _encoded(self, tokenizer, i: int, split: str):
        """Token ids of prompts (and choice continuations), computed once per tokenizer."""
        if self._tok is not tokenizer:
            self._tok, self._enc = tokenizer, {}
        key = (i, split)
        if key not in self._enc:
            s = self.data[i][split]
            prompts = [list(ids) for ids in tokenizer(s.prompts)["input_ids"]]
            for j, ids in enumerate(prompts):
                if not ids:
                    raise UserError(f"fitness.tasks[{i}].path: {self.cfg.tasks[i].path}: {split} example "
                                    f"{j + 1} has a prompt of no tokens (the tokenizer adds no BOS)")
            if self.cfg.tasks[i].kind == "generate":
                self._enc[key] = prompts
            else:
                flat = [c for ch in s.choices for c in ch]
                conts = tokenizer(flat, add_special_tokens=False)["input_ids"]
                rows, k = [], 0
                for j, ch in enumerate(s.choices):
                    for _ in ch:
                        rows.append((j, prompts[j], list(conts[k])))
                        k += 1
                self._enc[key] = rows
        return self._enc[key]

    def _pad_id(self, tokenizer) -> int:
        for tid in (tokenizer.pad_token_id, tokenizer.eos_token_id, 0):
            if tid is not None:
                return int(tid)
        return 0

    def _generate(self, model, tokenizer, prompts: list[list[int]], s: _Split, max_new: int) -> np.ndarray:
        import torch
        from transformers import GenerationConfig

        pad = self._pad_id(tokenizer)
        eos = tokenizer.eos_token_id
        gen_cfg = GenerationConfig(do_sample=False, num_beams=1, max_new_tokens=max_new,
                                   pad_token_id=pad, eos_token_id=eos)
        order = sorted(range(len(prompts)), key=lambda j: len(prompts[j]))
        correct = np.zeros(len(prompts), dtype=bool)
        bs = self.cfg.batch_size
        for start in range(0, len(order), bs):
            idx = order[start:start + bs]
            width = max(len(prompts[j]) for j in idx)
            ids = torch.full((len(idx), width), pad, dtype=torch.long)
            mask = torch.zeros((len(idx), width), dtype=torch.long)
            for r, j in enumerate(idx):  # left padding
                n = len(prompts[j])
                ids[r, width - n:] = torch.tensor(prompts[j], dtype=torch.long)
                mask[r, width - n:] = 1
            out = model.generate(input_ids=ids.to(model.device), attention_mask=mask.to(model.device),
                                 generation_config=gen_cfg)
            new = out[:, width:].tolist()
            for r, j in enumerate(idx):
                toks = new[r]
                if eos is not None and eos in toks:
                    toks = toks[:toks.index(eos)]
                text = tokenizer.decode(toks, skip_special_tokens=True)
                correct[j] = text.split("\n", 1)[0].strip() == s.answers[j]
        return correct

    def _choose(self, model, rows: list[tuple[int, list[int], list[int]]], s: _Split) -> np.ndarray:
        import torch

        ll = np.zeros(len(rows), dtype=np.float64)
        order = sorted(range(len(rows)), key=lambda r: len(rows[r][1]) + len(rows[r][2]))
        bs = self.cfg.batch_size
        for start in range(0, len(order), bs):
            idx = order[start:start + bs]
            seqs = [rows[r][1] + rows[r][2] for r in idx]
            width = max(len(q) for q in seqs)
            ids = torch.zeros((len(idx), width), dtype=torch.long)
            mask = torch.zeros((len(idx), width), dtype=torch.long)
            for k, q in enumerate(seqs):  # right padding: positions 0..n-1 as unpadded
                ids[k, :len(q)] = torch.tensor(q, dtype=torch.long)
                mask[k, :len(q)] = 1
            logits = model(input_ids=ids.to(model.device), attention_mask=mask.to(model.device),
                           use_cache=False).logits
            # continuation token t (at position p) is predicted by the logits at p - 1
            b_idx, p_idx, tgt = [], [], []
            owner = []
            for k, r in enumerate(idx):
                n_ctx, n_cont = len(rows[r][1]), len(rows[r][2])
                for p in range(n_ctx, n_ctx + n_cont):
                    b_idx.append(k)
                    p_idx.append(p - 1)
                    tgt.append(seqs[k][p])
                    owner.append(k)
            dev = logits.device
            sel = logits[torch.tensor(b_idx, device=dev), torch.tensor(p_idx, device=dev)].float()
            lp = torch.log_softmax(sel, dim=-1).gather(1, torch.tensor(tgt, device=dev)[:, None])[:, 0]
            sums = torch.zeros(len(idx), dtype=torch.float64).index_add_(
                0, torch.tensor(owner), lp.double().cpu())
            for k, r in enumerate(idx):
                ll[r] = float(sums[k])
        correct = np.zeros(len(s), dtype=bool)
        k = 0
        for j, ch in enumerate(s.choices):
            correct[j] = int(np.argmax(ll[k:k + len(ch)])) == s.answers[j]
            k += len(ch)
        return correct


def accuracy_scorer(tasks: dict[str, str], batch_size: int = 64):
    """score(model, tokenizer) -> {task: {"train": accuracy, "test": accuracy}} on task files {name: path} (a name
    ending in '_mc' is a choice task, else generate): how the tiny-LM zoo reports its family (family.json)."""
    fitness = LMTasksFitness(LMTasksFitnessConfig(name="lm_tasks", batch_size=batch_size, tasks=[
        {"name": t, "path": p, "kind": "choice" if t.endswith("_mc") else "generate"} for t, p in tasks.items()]))

    def score(model, tokenizer) -> dict:
        _, _, train = fitness.evaluate_model(model, tokenizer)
        test = fitness.holdout_model(model, tokenizer)
        return {name[:-len("_accuracy")]: {"train": train[name],
                                           "test": test[f"{name[:-len('_accuracy')]}_test_accuracy"]}
                for name in train}

    return score

