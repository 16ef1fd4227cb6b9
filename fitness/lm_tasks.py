"""Causal-LM tasks from JSONL: greedy exact match ("generate") or log-likelihood choice ("choice").

Each JSONL line is one example with a ``split`` of ``"train"`` (searched on) or ``"test"`` (held out):

* generate: ``{"prompt": "rev abc=", "answer": "cba", "split": "train"}``; the model decodes greedily
  up to ``max_new_tokens``; the output is cut at the end-of-sequence token and at the first newline,
  stripped, and compared with ``str(answer).strip()``.
* choice: ``{"prompt": "12+7=", "choices": ["19", "18"], "answer": 0, "split": "test"}``; the pick is
  the choice whose tokens, appended to the prompt, have the highest summed log-likelihood.

Choice scoring (``choice_scoring``): "shared_prefix" (the default) packs one row per example,
[prompt, choice_1, ..., choice_C], the prompt left-padded so that it ends in the same column in every
row of a batch. A 4-D block attention mask lets each choice attend to the prompt and to its own earlier
tokens only, and explicit position_ids continue every choice from the prompt's length, so each token
sees exactly what it sees in its own (prompt + choice) sequence: the prompt runs once for all its
choices, and the LM head (``logits_to_keep``, a 1-D tensor of columns) runs only at the columns that
predict a continuation token. "per_choice" runs every (prompt, choice) pair as a row of its own, the
LM head at every position. Both give the same log-likelihoods (to float rounding) and picks.
The packed row needs a model whose attention honours a prepared 4-D mask: a transformers causal LM
(Llama/Qwen/Mistral style) whose forward takes ``position_ids`` and whose attention implementation is
"sdpa" or "eager" (transformers uses a 4-D mask as given; checked with 5.24 on Llama, Qwen2/3, Mistral,
Phi-3, Gemma 2/3, float32 and bfloat16). Anything else (flash-attention, flex,
a model without ``config``/``position_ids``, layers other than full or sliding attention such as
linear/recurrent ones, or a sliding window shorter than a task's longest prompt + choice) falls back
to the per-choice path; log-softmax runs in float32 on either path.

Per-example scores (0/1) on the train split are concatenated over tasks in config order; the fitness
is the weight-averaged per-task accuracy. A subset of them (``examples``, see fitness/base.py) runs
only the selected examples: each task's accuracy is over its selected examples (omitted for a task
with none) and the fitness is the weighted mean over the tasks that have any.
"""
from __future__ import annotations

import inspect
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import Field, model_validator

from evomerge.errors import UserError
from evomerge.files import read_utf8
from evomerge.schema import Frozen

from .base import Fitness, split_examples, task_summary


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
    batch_size: int = Field(32, ge=1, description="per forward pass: prompts (generate); examples, each "
                                                  "a row of its prompt and all its choices (choice, "
                                                  "shared_prefix); prompt-choice pairs (choice, per_choice)")
    choice_scoring: Literal["shared_prefix", "per_choice"] = Field(
        "shared_prefix", description="choice tasks: 'shared_prefix' runs each prompt once for all its "
                                     "choices (one packed row, block attention mask) and the LM head "
                                     "only where a choice token is predicted; 'per_choice' runs each "
                                     "prompt-choice pair as its own row. Same scores; shared_prefix "
                                     "falls back to per_choice where the model cannot take the packed "
                                     "row (not sdpa/eager attention, recurrent layers)")

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
    spaces = ("hf_merge", "hf_mixture", "hf_layers")
    differentiable = True  # loss_model: the answers' NLL

    @classmethod
    def objectives(cls, cfg: LMTasksFitnessConfig) -> list[str]:
        return [f"{t.name}_accuracy" for t in cfg.tasks] if len(cfg.tasks) > 1 else []

    @classmethod
    def example_counts(cls, cfg: LMTasksFitnessConfig) -> list[int]:
        """Train examples per task (after `limit`), in config order."""
        return [len(d["train"]) for d in load_tasks(cfg.tasks)]

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

    @classmethod
    def from_scores(cls, cfg: LMTasksFitnessConfig, counts, examples, scores):
        return task_summary([t.name for t in cfg.tasks], [t.weight for t in cfg.tasks], counts, examples, scores)

    def evaluate_model(self, model, tokenizer, examples: np.ndarray | None = None
                       ) -> tuple[float, np.ndarray, dict[str, float]]:
        """Search split scores; `examples` (sorted indices into the concatenated train examples, see
        fitness/base.py): only those are run, their scores returned in that order (none selected: no
        metrics and a NaN fitness)."""
        picks = split_examples(examples, [len(d["train"]) for d in self.data])
        accs, scores = self._run(model, tokenizer, "train", picks)
        metrics, num, den = {}, 0.0, 0.0
        for t, a, sc in zip(self.cfg.tasks, accs, scores):
            if len(sc):
                metrics[f"{t.name}_accuracy"] = a
                num, den = num + t.weight * a, den + t.weight
        fitness = num / den if den else float("nan")
        return float(fitness), np.concatenate(scores).astype(np.float32), metrics

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
                pairs = [(p, conts[a]) for (p, conts), a in zip(enc, s.answers)]
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

    def _run(self, model, tokenizer, split: str, picks: list[np.ndarray | None] | None = None
             ) -> tuple[list[float], list[np.ndarray]]:
        """Per task, the accuracy and the 0/1 scores of the examples of `split` (picks[i]: task i's local
        indices to run, None: all)."""
        import torch

        if model.training:
            model.eval()
        picks = picks or [None] * len(self.cfg.tasks)
        accs, scores = [], []
        with torch.inference_mode():
            for i, (spec, data, pick) in enumerate(zip(self.cfg.tasks, self.data, picks)):
                s = data[split]
                idx = range(len(s)) if pick is None else [int(j) for j in pick]
                if not len(idx):
                    accs.append(float("nan"))
                    scores.append(np.zeros(0, dtype=np.float32))
                    continue
                enc = self._encoded(tokenizer, i, split)
                answers = [s.answers[j] for j in idx]
                if spec.kind == "generate":
                    correct = self._generate(model, tokenizer, [enc[j] for j in idx], answers, spec.max_new_tokens)
                else:
                    correct = self._choose(model, [enc[j] for j in idx], answers)
                scores.append(correct.astype(np.float32))
                accs.append(float(correct.mean()))
        return accs, scores

    def _encoded(self, tokenizer, i: int, split: str):
        """Token ids, computed once per tokenizer: per example, the prompt's (generate) or (the prompt's,
        [each choice's continuation]) (choice)."""
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
                conts = [list(c) for c in tokenizer(flat, add_special_tokens=False)["input_ids"]] if flat else []
                rows, k = [], 0
                for j, ch in enumerate(s.choices):
                    rows.append((prompts[j], conts[k:k + len(ch)]))
                    k += len(ch)
                self._enc[key] = rows
        return self._enc[key]

    def _pad_id(self, tokenizer) -> int:
        for tid in (tokenizer.pad_token_id, tokenizer.eos_token_id, 0):
            if tid is not None:
                return int(tid)
        return 0

    def _generate(self, model, tokenizer, prompts: list[list[int]], answers: list[str], max_new: int) -> np.ndarray:
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
                correct[j] = text.split("\n", 1)[0].strip() == answers[j]
        return correct

    # choice scoring ------------------------------------------------------------------------------

    def _choose(self, model, exs: list[tuple[list[int], list[list[int]]]], answers: list[int]) -> np.ndarray:
        """Per example (prompt ids, [choice ids]): is the highest summed log-likelihood the answer's?"""
        ll = self._choice_loglik(model, exs)
        return np.array([int(np.argmax(v)) == a for v, a in zip(ll, answers)], dtype=bool)

    def _choice_loglik(self, model, exs: list[tuple[list[int], list[list[int]]]]) -> list[np.ndarray]:
        """Per example, the summed log-likelihood (float64) of each choice's tokens after the prompt, by
        `choice_scoring` (shared_prefix where the model can take the packed row, see the module's docstring)."""
        if self.cfg.choice_scoring == "shared_prefix" and shared_prefix_supported(
                model, max(len(p) + max(len(c) for c in conts) for p, conts in exs)):
            return self._shared_prefix_loglik(model, exs)
        return self._per_choice_loglik(model, exs)

    def _per_choice_loglik(self, model, exs: list[tuple[list[int], list[list[int]]]]) -> list[np.ndarray]:
        """Every (prompt, choice) pair a row of its own (right padded), full logits."""
        import torch

        rows = [(p, c) for p, conts in exs for c in conts]
        ll = np.zeros(len(rows), dtype=np.float64)
        order = sorted(range(len(rows)), key=lambda r: len(rows[r][0]) + len(rows[r][1]))
        bs = self.cfg.batch_size
        for start in range(0, len(order), bs):
            idx = order[start:start + bs]
            seqs = [rows[r][0] + rows[r][1] for r in idx]
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
            for k, r in enumerate(idx):
                n_ctx, n_cont = len(rows[r][0]), len(rows[r][1])
                for p in range(n_ctx, n_ctx + n_cont):
                    b_idx.append(k)
                    p_idx.append(p - 1)
                    tgt.append(seqs[k][p])
            ll_rows = _gather_loglik(logits, b_idx, p_idx, tgt)
            np.add.at(ll, [idx[k] for k in b_idx], ll_rows)
        out, k = [], 0
        for _, conts in exs:
            out.append(ll[k:k + len(conts)])
            k += len(conts)
        return out

    def _shared_prefix_loglik(self, model, exs: list[tuple[list[int], list[list[int]]]]) -> list[np.ndarray]:
        """One row per example: [left padding, prompt, choice_1, ..., choice_C, right padding], the prompts
        of a batch ending in one column; a block mask and position_ids make each choice see the prompt and
        its own earlier tokens only; the LM head runs at the columns that predict a choice token."""
        import torch

        out = [np.zeros(len(conts), dtype=np.float64) for _, conts in exs]
        order = sorted(range(len(exs)), key=lambda j: (len(exs[j][0]), sum(len(c) for c in exs[j][1])))
        eager = model.config._attn_implementation == "eager"
        keep_logits = "logits_to_keep" in inspect.signature(model.forward).parameters
        dev = model.device
        bs = self.cfg.batch_size
        for start in range(0, len(order), bs):
            idx = order[start:start + bs]
            wp = max(len(exs[j][0]) for j in idx)
            width = wp + max(sum(len(c) for c in exs[j][1]) for j in idx)
            ids = torch.zeros((len(idx), width), dtype=torch.long)
            pos = torch.zeros((len(idx), width), dtype=torch.long)
            seg = torch.full((len(idx), width), -1, dtype=torch.long)  # -1 padding, 0 prompt, c + 1 choice c
            b_idx, col, tgt, owner = [], [], [], []  # per continuation token: row, predicting column, id, choice
            for b, j in enumerate(idx):
                prompt, conts = exs[j]
                n = len(prompt)
                ids[b, wp - n:wp] = torch.tensor(prompt, dtype=torch.long)
                pos[b, wp - n:wp] = torch.arange(n)
                seg[b, wp - n:wp] = 0
                at = wp
                for c, cont in enumerate(conts):
                    m = len(cont)
                    ids[b, at:at + m] = torch.tensor(cont, dtype=torch.long)
                    pos[b, at:at + m] = torch.arange(n, n + m)
                    seg[b, at:at + m] = c + 1
                    for t, tok in enumerate(cont):
                        b_idx.append(b)
                        col.append(wp - 1 if t == 0 else at + t - 1)
                        tgt.append(tok)
                        owner.append((j, c))
                    at += m
            cols = torch.arange(width)
            sq, sk = seg[:, :, None], seg[:, None, :]  # query rows, key columns
            allowed = (cols[:, None] >= cols[None, :]) & (sk >= 0) & ((sk == 0) | (sk == sq))
            allowed |= torch.eye(width, dtype=torch.bool)  # padding attends to itself: no empty softmax row
            allowed = allowed[:, None]  # (batch, 1, query, key)
            if eager:  # eager adds the mask to the scores; sdpa takes a boolean one
                dtype = model.dtype
                mask = torch.zeros(allowed.shape, dtype=dtype).masked_fill_(~allowed, torch.finfo(dtype).min)
            else:
                mask = allowed
            kw = {}
            keep = sorted(set(col))
            if keep_logits:
                kw["logits_to_keep"] = torch.tensor(keep, dtype=torch.long, device=dev)
                where = {c: k for k, c in enumerate(keep)}
                col = [where[c] for c in col]
            logits = model(input_ids=ids.to(dev), attention_mask=mask.to(dev), position_ids=pos.to(dev),
                           use_cache=False, **kw).logits
            for (j, c), v in zip(owner, _gather_loglik(logits, b_idx, col, tgt)):
                out[j][c] += v
        return out


def _gather_loglik(logits, b_idx: list[int], p_idx: list[int], tgt: list[int]) -> np.ndarray:
    """log_softmax (in float32 at least) of logits[b, p] at token tgt, for each (b, p, tgt); float64."""
    import torch

    dev = logits.device
    sel = logits[torch.tensor(b_idx, device=dev), torch.tensor(p_idx, device=dev)]
    sel = sel.to(torch.promote_types(sel.dtype, torch.float32))
    lp = torch.log_softmax(sel, dim=-1).gather(1, torch.tensor(tgt, device=dev)[:, None])[:, 0]
    return lp.double().cpu().numpy()


def shared_prefix_supported(model, longest: int) -> bool:
    """Whether `model` honours the packed row's 4-D mask and position_ids (see the module's docstring);
    `longest`: the longest prompt + choice in tokens (a sliding window must cover it)."""
    cfg = getattr(model, "config", None)
    if getattr(cfg, "_attn_implementation", None) not in ("sdpa", "eager") or getattr(cfg, "is_causal", True) is False:
        return False
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False
    if "position_ids" not in params or "attention_mask" not in params:
        return False
    kinds = set(getattr(cfg, "layer_types", None) or ())
    if kinds - {"full_attention", "sliding_attention"}:
        return False  # e.g. linear attention or recurrent layers, which a mask does not confine
    window = getattr(cfg, "sliding_window", None)
    if getattr(cfg, "use_sliding_window", True) is False or (kinds and "sliding_attention" not in kinds):
        window = None
    return not (isinstance(window, int) and 0 < window < longest)


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

