"""The served model: an hf_merge space's resident model, the merge it holds (and copies of recent
merges), and generation from it, one request at a time."""
from __future__ import annotations

import hashlib
import json
import secrets
import threading
from collections.abc import Mapping

from ..wire import ChatMessage, MergeSpec, RequestError


class ModelHost:
    """The resident model of an hf_merge space and the merge it currently holds."""

    def __init__(self, space, default_recipe: dict | None = None, device: str | None = None, merge_cache: int = 0,
                 max_context: int | None = None):
        from collections import OrderedDict

        self.space = space
        self.rt = space.open_runtime(device)
        self.default = default_recipe
        self.lock = threading.Lock()  # the resident model: one request at a time
        # the tokenizer, apart from the model: a prompt is measured (and refused) while another generates
        self.tok_lock = threading.Lock()
        self.context = max_context or context_length(self.rt.model)
        self.current: str | None = None
        # copies of the last `merge_cache` merges' tensors: switching back to one is a copy, not a merge
        self.merge_cache, self.snapshots = merge_cache, OrderedDict()
        self.stats = {"requests": 0, "merges": 0, "merge_reused": 0, "merge_cache_hits": 0}

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

    def _hold(self, recipe: dict):
        key = hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()
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

    def complete(self, recipe: dict, prompt_ids: list[int], max_tokens: int, temperature: float, top_p: float,
                 stop: list[str], seed: int | None, top_k_logprobs: int | None, echo: bool) -> dict:
        """Continue one prompt. Returns text, tokens with logprobs, finish_reason and token counts."""
        import torch

        tok = self.rt.tokenizer
        with self.lock:
            self.stats["requests"] += 1
            model = self._hold(recipe)
            dev = model.device
            ids = torch.tensor([prompt_ids], dtype=torch.long, device=dev)
            gen = torch.Generator(device="cpu").manual_seed(seed if seed is not None else secrets.randbits(62))
            out_ids: list[int] = []
            entries: list[dict] = []
            finish = "length"
            with torch.inference_mode():
                if echo:
                    logits = _finite(model(input_ids=ids, use_cache=False).logits[0].float())
                    lp = torch.log_softmax(logits, -1)
                    for i, t in enumerate(prompt_ids):
                        entries.append(self._entry(t, None if i == 0 else lp[i - 1], top_k_logprobs))
                past, step_ids = None, ids
                text = ""
                for _ in range(max_tokens):
                    out = model(input_ids=step_ids, past_key_values=past, use_cache=True)
                    past = out.past_key_values
                    logits = _finite(out.logits[0, -1].float())
                    lp = torch.log_softmax(logits, -1)
                    if temperature == 0:
                        nxt = int(torch.argmax(logits))
                    else:
                        probs = torch.softmax(logits / temperature, -1).cpu()
                        if top_p < 1.0:
                            sp, si = torch.sort(probs, descending=True)
                            keep = torch.cumsum(sp, 0) - sp < top_p
                            probs = torch.zeros_like(probs).scatter_(0, si[keep], sp[keep])
                        nxt = int(torch.multinomial(probs / probs.sum(), 1, generator=gen))
                    if tok.eos_token_id is not None and nxt == tok.eos_token_id:
                        finish = "stop"
                        break
                    out_ids.append(nxt)
                    entries.append(self._entry(nxt, lp, top_k_logprobs))
                    if stop:
                        with self.tok_lock:
                            text = tok.decode(out_ids, skip_special_tokens=True)
                    if stop and any(s in text for s in stop):
                        finish = "stop"
                        break
                    step_ids = torch.tensor([[nxt]], dtype=torch.long, device=dev)
        with self.tok_lock:
            text = tok.decode(out_ids, skip_special_tokens=True)
        for s in stop:
            if s in text:
                text = text[:text.index(s)]
        return {"text": text, "entries": entries, "finish_reason": finish,
                "prompt_tokens": len(prompt_ids), "completion_tokens": len(out_ids)}

    def _entry(self, token: int, lp, top_k: int | None) -> dict:
        tok = self.rt.tokenizer
        with self.tok_lock:
            e = {"token": tok.decode([token]), "logprob": None if lp is None else float(lp[token]), "top": {}}
            if lp is not None and top_k:
                vals, idx = lp.topk(top_k)
                e["top"] = {tok.decode([int(i)]): float(v) for v, i in zip(vals, idx)}
        return e

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


def _finite(logits):
    import torch

    if not bool(torch.isfinite(logits).all()):
        raise RequestError(400, "merge: the merged model's outputs are not finite (NaN or Inf); use smaller "
                                "coefficients", "merge")
    return logits

