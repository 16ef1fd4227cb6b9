"""lm-evaluation-harness tasks, scored on the worker's resident model through lm-eval's HFLM.

Any lm-eval task works: the built-in ones (their data must be reachable: cached or downloadable) or
YAML tasks of your own in `include_path`, e.g. over local JSONL files (``dataset_path: json``;
``run.py zoo tinylm`` writes such tasks for its family into ``<out>/lm_eval_tasks``).

* The fitness is the weight-averaged value of each task's `metric` on its search split; each task's
  metric is also reported as ``<task>/<metric>`` (the objectives of the Pareto front with >= 2 tasks).
* Per-example scores are lm-eval's per-sample values of that metric (``log_samples``), in doc order,
  concatenated over tasks in config order. So only metrics lm-eval averages over examples qualify
  (acc, acc_norm, exact_match, ...), not corpus-level ones (f1, bleu, mcc) nor lower-is-better ones.
* Splits: a task is searched on its ``split`` (default: the task's validation_split if it has one,
  else its test_split); the best is scored once more on its ``holdout_split`` (default: the task's
  test_split when that is not the searched split), reported as ``<task>/<metric>@<split>``, plus
  ``fitness@holdout`` when every task has one. Few-shot examples come from the task's own
  fewshot_split (else lm-eval's rule: its training, else validation, else test split): keep them
  off the held-out split.

The resident model is wrapped in an HFLM once per worker (candidates are merged into it in place)
and the tasks (with their datasets) are built once per worker; lm-eval's response and request
caches stay off, so every candidate is scored afresh.
"""
from __future__ import annotations

import contextlib
import logging

import numpy as np

from evomerge.errors import UserError

from .base import Fitness
from .lm_eval_tasks import LMEvalFitnessConfig, load_checked, quiet_logs


@contextlib.contextmanager
def _no_request_progress():
    """lm-eval builds each task's requests under a tqdm bar of its own: muted while we evaluate."""
    import functools

    import lm_eval.api.task as task_mod

    old = task_mod.tqdm
    task_mod.tqdm = functools.partial(old, disable=True)
    try:
        yield
    finally:
        task_mod.tqdm = old


_QUIET_HFLM = None


def _quiet_hflm():
    """HFLM without its per-call progress bars (tokenizing, requests)."""
    global _QUIET_HFLM
    if _QUIET_HFLM is None:
        from lm_eval.models.huggingface import HFLM

        class QuietHFLM(HFLM):
            """Also keeps the token ids of each (context, continuation) pair: they depend on the
            tokenizer only, which stays the same while the weights change (the prompts are the same
            for every candidate, and tokenizing them was a third of the time of a choice task)."""

            def __init__(self, *args, **kwargs):
                super().__init__(*args, **kwargs)
                self._pairs: dict = {}

            def _encode_pair(self, context, continuation):
                key = (context, continuation)
                hit = self._pairs.get(key)
                if hit is None:
                    hit = super()._encode_pair(context, continuation)
                    if len(self._pairs) < 1_000_000:
                        self._pairs[key] = hit
                return hit

            def loglikelihood(self, requests, disable_tqdm: bool = False):
                return super().loglikelihood(requests, disable_tqdm=True)

            def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
                return super().loglikelihood_rolling(requests, disable_tqdm=True)

            def generate_until(self, requests, disable_tqdm: bool = False):
                return super().generate_until(requests, disable_tqdm=True)

        _QUIET_HFLM = QuietHFLM
    return _QUIET_HFLM


# the fitness --------------------------------------------------------------------------------------

class LMEvalFitness(Fitness):
    input = "model"
    spaces = ("hf_merge", "hf_mixture")

    @classmethod
    def objectives(cls, cfg: LMEvalFitnessConfig) -> list[str]:
        return [f"{t.name}/{t.metric}" for t in cfg.tasks] if len(cfg.tasks) > 1 else []

    @classmethod
    def check(cls, cfg: LMEvalFitnessConfig) -> None:
        """In the driver before Ray starts: lm-eval is installed, every task exists and loads, every
        metric is one its task produces per example, the splits exist."""
        quiet_logs()
        load_checked(cfg, check_data=True)

    def __init__(self, cfg: LMEvalFitnessConfig, shared=None):
        quiet_logs()
        super().__init__(cfg, shared)
        self.tasks, self.plans = load_checked(cfg)  # once per worker: datasets and prompts templates
        self._lm = None
        self._lm_key = None

    def _wrap(self, model, tokenizer):
        """The HFLM around the resident model: made once, reused while the model object is the same
        (candidates are written into its weights in place; HFLM keeps no outputs between calls)."""
        key = (id(model), id(tokenizer))
        if self._lm is None or self._lm_key != key:
            hf_logger = logging.getLogger("lm_eval.models.huggingface")
            level = hf_logger.level
            hf_logger.setLevel(logging.ERROR)  # "pretrained is not a str": that is the point here
            try:
                self._lm = _quiet_hflm()(pretrained=model, tokenizer=tokenizer, batch_size=self.cfg.batch_size,
                                device=str(model.device), max_length=self.cfg.max_length)
            finally:
                hf_logger.setLevel(level)
            self._lm_key = key
            self._held = (model, tokenizer)  # keeps the ids unique while cached
        return self._lm

    def _run(self, model, tokenizer, holdout: bool) -> tuple[dict[str, float], list[np.ndarray]]:
        """Evaluate the tasks on their search (or held-out) splits: {task: value}, per-example arrays."""
        from lm_eval.evaluator import evaluate
        from lm_eval.evaluator_utils import get_sample_size

        if self.cfg.apply_chat_template and getattr(tokenizer, "chat_template", None) is None:
            raise UserError("fitness.apply_chat_template: the model's tokenizer has no chat template")
        lm = self._wrap(model, tokenizer)
        if model.training:
            model.eval()
        plans = [p for p in self.plans if not holdout or p.holdout_split is not None]
        if not plans:
            return {}, []
        samples = {}
        for p in plans:
            task = self.tasks[p.name]
            task.set_config(key="test_split", value=p.holdout_split if holdout else p.split)
            task.set_config(key="num_fewshot", value=p.num_fewshot)
            task.set_fewshot_seed(seed=self.cfg.fewshot_seed)  # the same shots for every candidate
            if not holdout and p.limit is not None:
                samples[p.name] = range(min(get_sample_size(task, p.limit), len(task.eval_docs)))
        with _no_request_progress():
            res = evaluate(lm=lm, task_dict={"tasks": {p.name: self.tasks[p.name] for p in plans}, "groups": {}},
                           samples=samples or None, cache_requests=False, bootstrap_iters=0, log_samples=True,
                           system_instruction=self.cfg.system_instruction,
                           apply_chat_template=self.cfg.apply_chat_template,
                           fewshot_as_multiturn=self.cfg.fewshot_as_multiturn)
        values, per_example = {}, []
        for p in plans:
            rows = sorted((s for s in res["samples"][p.name] if s["filter"] == p.filter), key=lambda s: s["doc_id"])
            per_example.append(np.array([float(s[p.metric]) for s in rows], dtype=np.float32))
            values[p.name] = float(res["results"][p.name][f"{p.metric},{p.filter}"])
        return values, per_example

    def evaluate_model(self, model, tokenizer) -> tuple[float, np.ndarray, dict[str, float]]:
        values, per_example = self._run(model, tokenizer, holdout=False)
        metrics = {f"{p.name}/{p.key}": values[p.name] for p in self.plans}
        w = np.array([p.weight for p in self.plans], dtype=np.float64)
        fitness = float(np.dot(w, [values[p.name] for p in self.plans]) / w.sum())
        return fitness, np.concatenate(per_example), metrics

    def holdout_model(self, model, tokenizer) -> dict[str, float]:
        if not self.cfg.holdout:
            return {}
        values, _ = self._run(model, tokenizer, holdout=True)
        held = [p for p in self.plans if p.holdout_split is not None]
        out = {f"{p.name}/{p.key}@{p.holdout_split}": values[p.name] for p in held}
        if len(held) == len(self.plans):
            w = np.array([p.weight for p in held], dtype=np.float64)
            out["fitness@holdout"] = float(np.dot(w, [values[p.name] for p in held]) / w.sum())
        return out
