"""The served model: an hf_merge space's resident model, the merge it holds (and copies of recent
merges), and generation from it, in batches.

Request handlers (FastAPI runs them in a thread pool) tokenize, check the context and enqueue their rows
(`generate`), then wait. One scheduler thread owns the model: it takes the waiting rows of one merge (the
recipe's key) as a batch, up to --max-batch-rows rows and --max-batch-tokens padded tokens, merges (or
reuses the merge it holds) and continues them together (`batch.generate`); rows of that merge arriving
meanwhile join the running batch, and each row is answered as soon as it finishes. Requests for another
merge wait their turn: FIFO by merge (no row joins past a waiting row of another merge), with the held
merge keeping the model for at most one more batch.
"""
from __future__ import annotations

import copy
import hashlib
import json
import threading
import time
from collections.abc import Mapping

from ..wire import ChatMessage, MergeSpec, RequestError
from .batch import Row, generate

MAX_BATCH_ROWS = 32  # rows (prompts) generated together
MAX_BATCH_TOKENS = 16384  # rows x (longest prompt + most new tokens): the batch's KV cache, in token rows


class _Job:
    """One request's rows for one merge: filled in by the scheduler, waited on by the request's thread."""

    def __init__(self, key: str, recipe: dict, rows: list[Row]):
        self.key, self.recipe, self.rows = key, recipe, rows
        self.results: list[dict | None] = [None] * len(rows)
        self.error: Exception | None = None
        self.left = len(rows)
        self.finished = threading.Event()

    def settle(self, i: int, out) -> None:
        """Row i's result, or the exception that failed it (the request fails with its first)."""
        if isinstance(out, Exception):
            self.error = self.error or out
        else:
            self.results[i] = out
        self.left -= 1
        if self.left == 0:
            self.finished.set()


class ModelHost:
    """The resident model of an hf_merge space and the merge it currently holds."""

    def __init__(self, space, default_recipe: dict | None = None, device: str | None = None, merge_cache: int = 0,
                 max_context: int | None = None, max_batch_rows: int = MAX_BATCH_ROWS,
                 max_batch_tokens: int = MAX_BATCH_TOKENS):
        from collections import OrderedDict

        self.space = space
        self.rt = space.open_runtime(device)
        self.default = default_recipe
        # the request threads' tokenizer (a fast tokenizer is not safe to share between threads); the
        # scheduler decodes with a copy of its own, so a prompt is measured (and refused) while a batch runs
        self.tok_lock = threading.Lock()
        self.gen_tok = copy.deepcopy(self.rt.tokenizer)
        self.max_batch_rows, self.max_batch_tokens = max_batch_rows, max_batch_tokens
        self.cv = threading.Condition()  # guards pending, the sequence numbers and stats
        self.pending: list[tuple[int, _Job, int]] = []  # (arrival number, job, row index), in arrival order
        self._seq, self._picked_at = 0, 0
        self.worker: threading.Thread | None = None
        self.context = max_context or context_length(self.rt.model)
        self.current: str | None = None
        # copies of the last `merge_cache` merges' tensors: switching back to one is a copy, not a merge
        self.merge_cache, self.snapshots = merge_cache, OrderedDict()
        # requests: prompts that reached the queue; merge_reused: batches served by the merge already held;
        # batched_rows: rows generated in batches, joined_rows: those that joined a running batch;
        # busy_s: seconds the scheduler spent merging and generating
        self.stats = {"requests": 0, "merges": 0, "merge_reused": 0, "merge_cache_hits": 0, "batches": 0,
                      "batched_rows": 0, "joined_rows": 0, "largest_batch": 0, "busy_s": 0.0}

    def health(self) -> dict:
        """The counters of GET /health, and the batch limits."""
        with self.cv:
            return {**self.stats, "queued": len(self.pending), "max_batch_rows": self.max_batch_rows,
                    "max_batch_tokens": self.max_batch_tokens}

    def model_ids(self) -> list[str]:
        return (["merged"] if self.default else []) + ["base", *self.space.labels]

    def recipe(self, model: str, merge: MergeSpec | None) -> dict:
        """The recipe a request asks for: its merge field (per-expert values for every tensor group of the
        space, or a whole recipe), else `model`: 'merged' (the served run's best), 'base' or an expert
        (task arithmetic with that expert at weight 1). A RequestError (400, or 404 for an unknown model)."""
        space = self.space
        labels = space.labels
        if merge is not None:
            if merge.recipe is not None:
                return merge.checked_recipe(labels, space.groups)
            per = merge.per_expert(labels)
            group = per if space.cfg.method != "slerp" else {"t": [0.5 if merge.t is None else float(merge.t)]}
            return space.recipe_of({g: dict(group) for g in space.groups})
        if model == "merged":
            if self.default is None:
                raise RequestError(400, "model 'merged' needs merge coefficients ('merge' in the request body) "
                                        "or a served run (serve --run RUN_DIR)", "model")
            return self.default
        if model == "base" or model in labels:
            w = [1.0 if k == model else 0.0 for k in labels]
            return space.recipe_of({g: {"weight": w} for g in space.groups}, "task_arithmetic")
        raise RequestError(404, f"model {model!r} does not exist; served: {', '.join(self.model_ids())}",
                           "model", "model_not_found")

    def _hold(self, recipe: dict, key: str):
        """The resident model holding `recipe` (its key): as it is, from a cached copy, or merged now."""
        if key != self.current:
            self.current = None  # a failed merge leaves no claim on the resident weights
            if key in self.snapshots:
                import torch

                with torch.no_grad():
                    for name, t in self.snapshots[key].items():
                        self.rt.targets[name].copy_(t)
                self.snapshots.move_to_end(key)
                self.stats["merge_cache_hits"] += 1
            else:
                try:
                    self.rt.materialize(recipe)
                except (KeyError, IndexError, TypeError, ValueError) as e:
                    raise RequestError(400, f"merge: cannot build this merge: {type(e).__name__}: {e}",
                                       "merge") from None
                self.stats["merges"] += 1
                if self.merge_cache:
                    self.snapshots[key] = {n: t.detach().clone() for n, t in self.rt.targets.items()
                                           if t.is_floating_point()}
                    while len(self.snapshots) > self.merge_cache:
                        self.snapshots.popitem(last=False)
            self.current = key
        else:
            self.stats["merge_reused"] += 1
        return self.rt.model

    # generation --------------------------------------------------------------------------------
    def budget(self, n_prompt: int, max_tokens: int | None, param: str) -> int:
        """The tokens to generate after a prompt of `n_prompt` tokens: max_tokens (default 16, at most what
        the context leaves); a RequestError (400) when the prompt and max_tokens do not fit the context."""
        if self.context is None:
            return 16 if max_tokens is None else max_tokens
        if n_prompt + (max_tokens or 0) > self.context:
            asked = f"{n_prompt} prompt tokens" + (f" + max_tokens {max_tokens}" if max_tokens else "")
            raise RequestError(400, f"{param}: {asked} exceed the model's context of {self.context} tokens",
                               param, "context_length_exceeded")
        return min(16, self.context - n_prompt) if max_tokens is None else max_tokens

    def generate(self, recipe: dict, rows: list[Row]) -> list[dict]:
        """Continue the rows of one request with `recipe`'s merge, batched with whatever other requests for
        the same merge are waiting; blocks until all of them are done. Per row: text, tokens with logprobs
        (`entries`), finish_reason and token counts. A RequestError when the merge or a row is refused."""
        key = hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()
        job = _Job(key, recipe, rows)
        with self.cv:
            self.stats["requests"] += len(rows)
            for i in range(len(rows)):
                self.pending.append((self._seq, job, i))
                self._seq += 1
            if self.worker is None:
                self.worker = threading.Thread(target=self._serve_forever, name="evomerge-batches", daemon=True)
                self.worker.start()
            self.cv.notify()
        job.finished.wait()
        e = job.error
        if isinstance(e, RequestError):  # one per request: the batch's requests may share the scheduler's
            raise RequestError(e.status, e.message, e.param, e.code)
        if e is not None:
            raise e
        return job.results

    def complete(self, recipe: dict, prompt_ids: list[int], max_tokens: int, temperature: float, top_p: float,
                 stop: list[str], seed: int | None, top_k_logprobs: int | None, echo: bool) -> dict:
        """Continue one prompt (a request of one row)."""
        return self.generate(recipe, [Row(prompt_ids, max_tokens, temperature, top_p, stop, seed, top_k_logprobs,
                                          echo)])[0]

    def _serve_forever(self) -> None:
        """The scheduler: the one thread that uses the model. It takes the next batch, holds its merge and
        generates; rows of the same merge that arrive meanwhile join the running batch (while no row of
        another merge has waited longer), and each row's answer goes out as soon as the row finishes. An
        unexpected error fails the batch's unanswered requests (500 answers), never the thread."""
        while True:
            with self.cv:
                while not self.pending:
                    self.cv.wait()
                batch = self._pick()
                self.stats["batches"] += 1
                self.stats["batched_rows"] += len(batch)
                self.stats["largest_batch"] = max(self.stats["largest_batch"], len(batch))
            key, recipe, t0 = batch[0][1].key, batch[0][1].recipe, time.perf_counter()
            answered: set[int] = set()

            def sink(i: int, out) -> None:
                answered.add(i)
                batch[i][1].settle(batch[i][2], out)

            def join(live: int, width: int) -> list[Row]:
                if not live:
                    return []  # drained: the next batch is _pick's
                with self.cv:
                    more = self._join(key, live, width)
                batch.extend(more)
                return [job.rows[i] for _, job, i in more]

            try:
                model = self._hold(recipe, key)
                generate(model, self.gen_tok, [job.rows[i] for _, job, i in batch], sink, join)
            except Exception as e:  # noqa: BLE001 - the merge was refused or something broke: these requests fail
                for i, (_, job, r) in enumerate(batch):
                    if i not in answered:
                        job.settle(r, e)
            self.stats["busy_s"] = round(self.stats["busy_s"] + time.perf_counter() - t0, 3)

    def _join(self, key: str, live: int, width: int) -> list[tuple[int, _Job, int]]:
        """Rows of merge `key` to join a running batch of `live` rows and a cache `width` wide (under self.cv):
        those that arrived before every waiting row of another merge (FIFO by merge), within the caps."""
        others = [seq for seq, job, _ in self.pending if job.key != key]
        before = min(others) if others else self._seq
        more, rest, span, most = [], [], 0, 0
        for item in self.pending:
            seq, job, i = item
            row = job.rows[i]
            if job.key != key or seq >= before or live + len(more) >= self.max_batch_rows:
                rest.append(item)
                continue
            wide, deep = max(span, len(row.prompt_ids)), max(most, row.max_tokens)
            if (live + len(more) + 1) * (width + wide + deep) > self.max_batch_tokens:
                rest.append(item)
                continue
            more.append(item)
            span, most = wide, deep
        if more:
            self.pending = rest
            self.stats["batched_rows"] += len(more)
            self.stats["joined_rows"] += len(more)
            self.stats["largest_batch"] = max(self.stats["largest_batch"], live + len(more))
        return more

    def _pick(self) -> list[tuple[int, _Job, int]]:
        """The next batch (under self.cv), taken out of `pending`: the rows of one merge in arrival order, at
        most max_batch_rows of them, and rows x (longest prompt + most new tokens) within max_batch_tokens
        (the first row always goes). Whose merge: FIFO by group (the merge of the oldest waiting row), except
        that the merge the model holds keeps it for one more batch while the oldest row of another merge
        arrived during the last batch (it waits at most that batch: nobody starves, and a merge switch
        serves every row of the merge that has waited)."""
        seq, job, _ = self.pending[0]
        key = job.key
        if key != self.current and seq >= self._picked_at and any(j.key == self.current for _, j, _ in self.pending):
            key = self.current
        self._picked_at = self._seq
        batch, rest, longest, most = [], [], 0, 0
        for item in self.pending:
            row = item[1].rows[item[2]]
            if item[1].key != key or len(batch) >= self.max_batch_rows:
                rest.append(item)
                continue
            wide, deep = max(longest, len(row.prompt_ids)), max(most, row.max_tokens)
            if batch and (len(batch) + 1) * (wide + deep) > self.max_batch_tokens:
                rest.append(item)
                continue
            batch.append(item)
            longest, most = wide, deep
        self.pending = rest
        return batch

    def prompt_ids(self, text: str) -> list[int]:
        with self.tok_lock:  # a fast tokenizer is not safe to share between request threads
            ids = self.rt.tokenizer(text)["input_ids"]
        if not ids:
            raise RequestError(400, "prompt: empty after tokenization", "prompt")
        return list(ids)

    def chat_prompt(self, messages: list[ChatMessage]) -> list[int]:
        tok = self.rt.tokenizer
        msgs = [m.model_dump() for m in messages]
        if tok.chat_template:
            with self.tok_lock:
                ids = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True)
            if isinstance(ids, Mapping):  # newer transformers: a BatchEncoding
                ids = ids["input_ids"]
            return list(ids)
        # no chat template (e.g. the tiny LM): the messages' contents, one per line, are the prompt
        return self.prompt_ids("\n".join(m["content"] for m in msgs))


def context_length(model) -> int | None:
    """The longest sequence the model takes, from its config (None: no limit is known)."""
    fields = model.config.get_text_config().to_dict()
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length", "n_ctx"):
        v = fields.get(key)
        if isinstance(v, int) and not isinstance(v, bool) and v > 0:
            return v
    return None
