"""Score candidates through any OpenAI-compatible endpoint, with the official `openai` client.

Two settings (`mode`):

* ``merge``: the server hosts experts and merges per request (``run.py serve``, or a provider that
  takes coefficients): every request to `model` carries the candidate's weights (and densities) in
  the body's extra field ``merge``.
* ``ensemble``: the candidate's weights combine separate API models (`models` = the space's names):
  generate tasks by weighted vote over the models' answers, choice tasks by the weighted sum of
  the models' log-likelihoods of each choice (from ``echo`` + ``logprobs`` completions).

Tasks are the lm_tasks JSONL files. Generate answers are compared exactly (after strip), through
`answer_regex` (its first group, or the whole match, is compared), or judged by `judge_model` (a
yes/no prompt with the reference answer); choice tasks need logprobs.

Made for paid services: at most `concurrency` requests in flight per worker; 429, 5xx, timeouts,
connection errors and malformed bodies are retried with exponential backoff and jitter (never
counted as a model failure; a candidate fails only when `max_retries` are exhausted); responses
are cached by model, prompt and parameters; a hard budget (`max_requests`, `max_tokens`, shared by
all workers of a run through a Ray actor) is checked before each request, and when it is spent
the run stops cleanly (resumable); usage and cost are metrics of every evaluation. The API key is
read from the environment variable `api_key_env` in the worker; only the variable's name is ever
in a config, log or checkpoint.
"""
from __future__ import annotations

import hashlib
import itertools
import json
import os
import random
import re
import sys
import threading
import time
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from typing import Literal

import numpy as np
from pydantic import Field, model_validator

from evomerge.errors import UserError
from evomerge.schema import Frozen
from evomerge.wire import MergeSpec

from .base import Fitness, StopRun, split_examples, task_summary
from .budget import Budget, RemoteBudget, open_budget
from .lm_tasks import TaskSpec, check_unique_names, load_tasks


class APIFitnessConfig(Frozen):
    name: Literal["api"]
    base_url: str = Field(..., description="the endpoint, e.g. http://127.0.0.1:8000/v1")
    api_key_env: str | None = Field(None, description="environment variable holding the API key (never logged)")
    mode: Literal["merge", "ensemble"] = Field("merge", description="merge: send the weights to `model`; "
                                                                    "ensemble: combine the space's models")
    model: str = Field("base", description="merge mode: the model every request names")
    tasks: list[TaskSpec] = Field(..., min_length=1, description="JSONL tasks as for lm_tasks")
    answer_regex: str | None = Field(None, description="generate tasks: compare this pattern's first group "
                                                       "(or match) of the answer text instead of the whole text")
    judge_model: str | None = Field(None, description="generate tasks: let this model (same endpoint) judge each "
                                                      "answer against the reference instead of comparing text")
    judge_prompt: str = Field("Question: {prompt}\nReference answer: {answer}\nCandidate answer: {output}\n"
                              "Is the candidate answer correct? Answer yes or no.\nAnswer:",
                              description="the judge's prompt; its reply counts as correct when it starts with 'yes'")
    concurrency: int = Field(4, ge=1, le=256, description="requests in flight per worker")
    timeout_s: float = Field(30.0, gt=0, description="per request; also how long the search waits, before it "
                                                     "starts, for a server that is still loading")
    max_retries: int = Field(6, ge=0, description="retries of a request after 429 / 5xx / timeout / bad body")
    backoff_s: float = Field(0.2, ge=0, description="first retry delay; doubles each retry, with jitter")
    max_requests: int | None = Field(None, ge=1, description="hard budget of requests for the run (checkpointed)")
    max_tokens: int | None = Field(None, ge=1, description="hard budget of prompt + completion tokens (checkpointed)")
    price_per_1k_prompt: float = Field(0.0, ge=0, description="cost per 1,000 prompt tokens (for the cost metric)")
    price_per_1k_completion: float = Field(0.0, ge=0, description="cost per 1,000 completion tokens")
    cache_size: int = Field(100_000, ge=0, description="responses kept per worker (by model, prompt, parameters)")

    @model_validator(mode="after")
    def _names(self):
        check_unique_names(self.tasks)
        return self


class APIFitness(Fitness):
    input = "recipe"
    spaces = ("api_weights",)

    @classmethod
    def objectives(cls, cfg: APIFitnessConfig) -> list[str]:
        return [f"{t.name}_accuracy" for t in cfg.tasks] if len(cfg.tasks) > 1 else []

    @classmethod
    def example_counts(cls, cfg: APIFitnessConfig) -> list[int]:
        """Train examples per task (after `limit`): any subset of them can be scored (requests are sent
        only for the selected examples)."""
        return [len(d["train"]) for d in load_tasks(cfg.tasks)]

    @classmethod
    def check(cls, cfg: APIFitnessConfig) -> None:
        if cfg.api_key_env and not os.environ.get(cfg.api_key_env):
            raise UserError(f"fitness.api_key_env: {cfg.api_key_env} is not set in the environment")
        if cfg.answer_regex is not None:
            try:
                re.compile(cfg.answer_regex)
            except re.error as e:
                raise UserError(f"fitness.answer_regex: {e}") from None
        load_tasks(cfg.tasks)  # a defective task file is refused before any wait for the server
        _check_reachable(cfg)

    @classmethod
    def open_shared(cls, cfg: APIFitnessConfig, state: dict | None) -> Budget | RemoteBudget | None:
        """The run's budget (a Ray actor when Ray runs), with what earlier sessions spent (`state`, from
        the checkpoint); None when the config sets no limit."""
        return open_budget(cfg.max_requests, cfg.max_tokens, state)

    def __init__(self, cfg: APIFitnessConfig, shared: Budget | RemoteBudget | None = None):
        super().__init__(cfg, shared)
        self.data = load_tasks(cfg.tasks)  # once per worker
        self.client = _client(cfg, cfg.timeout_s)
        self.regex = re.compile(cfg.answer_regex) if cfg.answer_regex else None
        # the run's budget, as opened by open_shared; built in-process, without one: a budget of its own
        self.budget = shared if shared is not None else open_budget(cfg.max_requests, cfg.max_tokens, remote=False)
        self.cache: OrderedDict[str, dict] = OrderedDict()
        self._lock = threading.Lock()
        self.pool = ThreadPoolExecutor(cfg.concurrency)

    # one request ---------------------------------------------------------------------------------
    def _request(self, usage: dict, **params) -> dict:
        key = hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()
        with self._lock:
            if key in self.cache:
                self.cache.move_to_end(key)
                usage["cached"] += 1
                return self.cache[key]
        reserve = len(params.get("prompt", "")) + 8 + int(params.get("max_tokens") or 0)
        delay = self.cfg.backoff_s
        for attempt in range(self.cfg.max_retries + 1):
            if self.budget is not None and not self.budget.reserve(reserve):
                raise StopRun(f"API budget spent (max_requests={self.cfg.max_requests}, "
                              f"max_tokens={self.cfg.max_tokens})")
            self._count(usage, requests=1)
            try:
                resp = self.client.completions.create(**params)
                out = _parse(resp)
            except Exception as e:  # noqa: BLE001 - sorted into transient or not below
                if self.budget is not None:
                    self.budget.settle(reserve, 0)
                if not _transient(e) or attempt == self.cfg.max_retries:
                    raise RuntimeError(f"API request failed after {attempt + 1} attempts: "
                                       f"{type(e).__name__}: {str(e)[:200]}") from None
                self._count(usage, retries=1)
                time.sleep(delay * (1 + random.random()))
                delay *= 2
                continue
            if self.budget is not None:
                self.budget.settle(reserve, out["prompt_tokens"] + out["completion_tokens"])
            self._count(usage, prompt_tokens=out["prompt_tokens"], completion_tokens=out["completion_tokens"])
            if self.cfg.cache_size:
                with self._lock:
                    self.cache[key] = out
                    while len(self.cache) > self.cfg.cache_size:
                        self.cache.popitem(last=False)
            return out
        raise AssertionError("unreachable")

    def _count(self, usage: dict, **inc) -> None:
        with self._lock:
            for k, v in inc.items():
                usage[k] += v

    def _params(self, model: str, prompt: str, merge: dict | None, **kw) -> dict:
        p = {"model": model, "prompt": prompt, "temperature": 0, **kw}
        if merge is not None:
            p["extra_body"] = {"merge": merge}
        return p

    # scoring -------------------------------------------------------------------------------------
    def _targets(self, recipe: dict) -> list[tuple[str, float, dict | None]]:
        """(model, weight, merge field) per request target."""
        if self.cfg.mode == "merge":
            merge = MergeSpec(weights=recipe["weights"], density=recipe.get("density")).to_body()
            return [(self.cfg.model, 1.0, merge)]
        return [(m, w, None) for m, w in recipe["weights"].items()]

    def _generate(self, usage, targets, spec: TaskSpec, prompt: str, answer: str) -> float:
        votes: dict[str, float] = {}
        for model, w, merge in targets:
            if self.cfg.mode == "ensemble" and w == 0:
                continue
            out = self._request(usage, **self._params(model, prompt, merge, max_tokens=spec.max_new_tokens,
                                                      stop=["\n"]))
            text = self._extract(out["text"])
            votes[text] = votes.get(text, 0.0) + w
        if not votes:
            return 0.0
        # the answer with the largest total weight; ties go to the earliest model's answer
        chosen = max(votes.items(), key=lambda kv: kv[1])[0]
        if self.cfg.judge_model is None:
            return float(chosen == answer)
        verdict = self._request(usage, **self._params(
            self.cfg.judge_model, self.cfg.judge_prompt.format(prompt=prompt, answer=answer, output=chosen), None,
            max_tokens=3))
        return float(verdict["text"].strip().lower().startswith("yes"))

    def _extract(self, text: str) -> str:
        text = text.split("\n", 1)[0].strip()
        if self.regex is None:
            return text
        m = self.regex.search(text)
        return "" if m is None else (m.group(1) if m.groups() else m.group(0)).strip()

    def _choose(self, usage, targets, prompt: str, choices: list[str], answer: int) -> float:
        total = np.zeros(len(choices))
        for model, w, merge in targets:
            if self.cfg.mode == "ensemble" and w == 0:
                continue
            for k, c in enumerate(choices):
                out = self._request(usage, **self._params(model, prompt + c, merge, max_tokens=0, echo=True,
                                                          logprobs=0))
                if out["token_logprobs"] is None:
                    raise RuntimeError(f"{model}: the API returned no logprobs (choice tasks need them)")
                # the continuation's tokens: those starting at or after the prompt's end
                ll = sum(lp for off, lp in zip(out["text_offset"], out["token_logprobs"])
                         if lp is not None and off >= len(prompt))
                total[k] += w * ll
        return float(int(np.argmax(total)) == answer)

    def _score(self, recipe: dict, split: str, select: list[np.ndarray | None] | None = None
               ) -> tuple[list[float], list[np.ndarray], dict]:
        """Per task: accuracy (nan for a task with no example scored), the per-example scores of the
        selected examples (`select`: local indices per task, None: all of the split), and the usage."""
        usage = {"requests": 0, "cached": 0, "retries": 0, "prompt_tokens": 0, "completion_tokens": 0}
        targets = self._targets(recipe)
        select = select if select is not None else [None] * len(self.data)
        jobs, sizes = [], []
        for spec, data, sel in zip(self.cfg.tasks, self.data, select):
            s = data[split]
            idx = range(len(s)) if sel is None else [int(j) for j in sel]
            sizes.append(len(idx))
            for j in idx:
                if spec.kind == "generate":
                    jobs.append(self.pool.submit(self._generate, usage, targets, spec, s.prompts[j], s.answers[j]))
                else:
                    jobs.append(self.pool.submit(self._choose, usage, targets, s.prompts[j], s.choices[j],
                                                 s.answers[j]))
        try:
            flat = [f.result() for f in jobs]
        except BaseException:
            for f in jobs:
                f.cancel()
            raise
        accs, scores, k = [], [], 0
        for n in sizes:
            sc = np.array(flat[k:k + n], np.float32)
            k += n
            scores.append(sc)
            accs.append(float(sc.mean()) if n else float("nan"))
        return accs, scores, usage

    @classmethod
    def from_scores(cls, cfg: APIFitnessConfig, counts, examples, scores):
        return task_summary([t.name for t in cfg.tasks], [t.weight for t in cfg.tasks], counts, examples, scores)

    def evaluate_recipe(self, recipe: dict, examples: np.ndarray | None = None
                        ) -> tuple[float, np.ndarray, dict[str, float]]:
        """Scores on the search split, or on its subset `examples` (indices into the concatenated train
        examples, see fitness.base): requests only for those, per-task accuracies over each task's selected
        examples (absent for a task with none), the fitness their weighted mean over the tasks that have any."""
        counts = [len(d["train"]) for d in self.data]
        select = split_examples(examples, counts)
        accs, scores, usage = self._score(recipe, "train", select)
        has = [sel is None or len(sel) > 0 for sel in select]
        metrics = {f"{t.name}_accuracy": a for t, a, h in zip(self.cfg.tasks, accs, has) if h}
        metrics.update({f"api_{k}": float(v) for k, v in usage.items()})
        metrics["api_cost"] = (usage["prompt_tokens"] * self.cfg.price_per_1k_prompt
                               + usage["completion_tokens"] * self.cfg.price_per_1k_completion) / 1000
        w = np.array([t.weight for t, h in zip(self.cfg.tasks, has) if h], np.float64)
        a = np.array([a for a, h in zip(accs, has) if h], np.float64)
        fitness = float(np.dot(w, a) / w.sum()) if w.size else float("nan")
        return fitness, np.concatenate(scores), metrics

    def holdout_recipe(self, recipe: dict) -> dict[str, float]:
        accs, _, _ = self._score(recipe, "test")
        return {f"{t.name}_test_accuracy": a for t, a, d in zip(self.cfg.tasks, accs, self.data) if len(d["test"])}


def _client(cfg: APIFitnessConfig, timeout_s: float):
    """The `openai` client for `base_url`, the key read from $`api_key_env`; our own retries (counted,
    budgeted) replace the client's."""
    from openai import OpenAI

    key = os.environ.get(cfg.api_key_env, "") if cfg.api_key_env else "none"
    return OpenAI(base_url=cfg.base_url, api_key=key or "none", max_retries=0, timeout=timeout_s)


def _check_reachable(cfg: APIFitnessConfig) -> None:
    """GET /models before the search starts: nothing listening at `base_url` (after waiting up to
    `timeout_s` for a server that is still starting), or a key the server refuses, is a user error now
    rather than every candidate failing after its retries. Anything else (a slow server, no /models
    route, a 5xx) is left to the retries of the search itself."""
    import openai

    deadline = time.monotonic() + cfg.timeout_s
    with _client(cfg, min(cfg.timeout_s, 10.0)) as client:
        for attempt in itertools.count():
            try:
                client.models.list()
                return
            except openai.APITimeoutError:  # (a connection error too) something answers, slowly
                return
            except openai.APIConnectionError as e:
                if time.monotonic() > deadline:
                    why = str(e.__cause__ or e).splitlines()[0][:160]
                    raise UserError(f"fitness.base_url: nothing answers at {cfg.base_url} ({why}); start the "
                                    "server (e.g. python run.py serve --config ... --port N) or fix the URL") from None
                if attempt == 0:
                    print(f"waiting up to {cfg.timeout_s:g} s (fitness.timeout_s) for {cfg.base_url} to answer",
                          file=sys.stderr)
                time.sleep(0.5)
            except openai.AuthenticationError as e:
                raise UserError(f"fitness.api_key_env: {cfg.base_url} refused the key "
                                f"({'$' + cfg.api_key_env if cfg.api_key_env else 'no key set'}): "
                                f"HTTP {e.status_code}") from None
            except openai.APIError:
                return


def _parse(resp) -> dict:
    """The parts of a completions response the fitness uses; a malformed body raises ValueError."""
    try:
        choice = resp.choices[0]
        lp = choice.logprobs
        usage = resp.usage
        return {"text": str(choice.text or ""),
                "token_logprobs": None if lp is None else list(lp.token_logprobs),
                "text_offset": None if lp is None else list(lp.text_offset),
                "prompt_tokens": int(usage.prompt_tokens) if usage else 0,
                "completion_tokens": int(usage.completion_tokens) if usage else 0}
    except (AttributeError, IndexError, TypeError) as e:
        raise ValueError(f"malformed response: {e}") from None


def _transient(e: Exception) -> bool:
    import openai

    if isinstance(e, (openai.RateLimitError, openai.APITimeoutError, openai.APIConnectionError, ValueError,
                      json.JSONDecodeError, openai.APIResponseValidationError)):
        return True
    return isinstance(e, openai.APIStatusError) and e.status_code >= 500
