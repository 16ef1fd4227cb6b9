"""`evomerge serve`: an OpenAI-compatible HTTP server over a base model and a repository of experts.

Clients choose merge coefficients per request without seeing weights: a request may carry, in its
body's extra fields, ``"merge": {"weights": {"expert": w, ...}, "density": {...}}`` (the config
space's method, one value per expert for the whole model) or ``"merge": {"recipe": {...}}`` (a full
recipe as evals.jsonl logs it). The server merges it into its one resident model, in place, and
answers from it; consecutive requests with the same coefficients reuse the merge. Every coefficient
must be a finite number of magnitude at most MAX_COEFFICIENT (100; a density lies in (0, 1]): NaN,
Infinity (bare JSON tokens, which the parser accepts) or 1e308 is a 400 naming the field, never a
merge. Without `merge`,
`model` picks what answers: "base", an expert's label (task arithmetic with that expert at weight 1),
or "merged" (the served run's best recipe, `--run`).

Endpoints: GET /v1/models, POST /v1/completions (prompt, max_tokens, temperature, top_p, stop, seed,
logprobs, echo) and POST /v1/chat/completions (messages, max_tokens / max_completion_tokens,
temperature, top_p, stop, seed, logprobs, top_logprobs). A prompt (a chat's after its chat template)
longer than the model's context (its config's max_position_embeddings, or --max-context) minus
max_tokens is refused with a 400 (code context_length_exceeded) before it reaches the model (without
max_tokens, a completion takes 16 tokens or what the context leaves). Errors use OpenAI's body,
``{"error": {"message", "type", "param", "code"}}``: 400 for a malformed request, 401 for a missing or
wrong API key (`--api-key-env NAME`), 404 for an unknown model; anything unexpected is a 500 answer,
never a crash of the server.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import secrets
import threading
import time
import uuid
from pathlib import Path
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field

from ..errors import UserError

# the largest magnitude of a merge coefficient in a request: a task-arithmetic weight of 100 already
# swamps the base model; beyond, a merge only overflows (1e308 * a tensor is Inf, then NaN)
MAX_COEFFICIENT = 100.0
Coefficient = Annotated[float, Field(allow_inf_nan=False, ge=-MAX_COEFFICIENT, le=MAX_COEFFICIENT)]
SEED = Field(None, ge=-(2 ** 63), le=2 ** 64 - 1)  # what torch.Generator.manual_seed takes


class MergeSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    weights: dict[str, Coefficient] | None = None
    density: dict[str, Coefficient] | None = None
    gamma: dict[str, Coefficient] | None = None
    t: Coefficient | None = None
    recipe: dict[str, Any] | None = None


def check_recipe_numbers(value: Any, where: str) -> None:
    """A recipe's numbers: finite, coefficients (in `groups`) within +-MAX_COEFFICIENT, densities in
    (0, 1], the seed an integer torch can take; a RequestError (400) naming the first bad one."""
    if isinstance(value, dict):
        for k, v in value.items():
            check_recipe_numbers(v, f"{where}.{k}")
        return
    if isinstance(value, list):
        for i, v in enumerate(value):
            check_recipe_numbers(v, f"{where}[{i}]")
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return
    if where == "merge.recipe.seed":
        if not isinstance(value, int) or not -(2 ** 63) <= value < 2 ** 64:
            raise RequestError(400, f"{where}: must be an integer in [-2**63, 2**64)", where)
        return
    if not math.isfinite(value):
        raise RequestError(400, f"{where}: {value}: must be a finite number", where)
    if where.startswith("merge.recipe.groups.") and abs(value) > MAX_COEFFICIENT:
        raise RequestError(400, f"{where}: {value:g}: a coefficient's magnitude is at most {MAX_COEFFICIENT:g}",
                           where)
    if ".density[" in where and not 0.0 < value <= 1.0:
        raise RequestError(400, f"{where}: {value:g}: a density lies in (0, 1]", where)


class _Sampling(BaseModel):
    model_config = ConfigDict(extra="allow")  # unknown OpenAI fields (user, presence_penalty, ...) are ignored
    model: str
    max_tokens: int | None = Field(None, ge=0, le=4096)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    n: int = Field(1, ge=1, le=1)
    stop: str | list[str] | None = None
    seed: int | None = SEED
    merge: MergeSpec | None = None


class CompletionRequest(_Sampling):
    prompt: str | list[str]
    logprobs: int | None = Field(None, ge=0, le=20)
    echo: bool = False


class ChatMessage(BaseModel):
    role: str
    content: str


class ChatRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=0, le=4096)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)


class RequestError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code


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
        labels = self.space.labels
        if merge is not None:
            if merge.recipe is not None:
                r = merge.recipe
                if not isinstance(r.get("groups"), dict) or r.get("experts") != labels or "method" not in r:
                    raise RequestError(400, f"merge.recipe: needs 'method', 'experts' = {labels} and 'groups'",
                                       "merge.recipe")
                if set(r["groups"]) != set(self.space.groups):
                    raise RequestError(400, f"merge.recipe.groups: expected {self.space.groups}", "merge.recipe")
                check_recipe_numbers(r, "merge.recipe")
                return r
            per: dict[str, list[float]] = {}
            for name in ("weights", "density", "gamma"):
                given = getattr(merge, name)
                if given is None:
                    continue
                bad = sorted(set(given) - set(labels))
                if bad:
                    raise RequestError(400, f"merge.{name}: unknown expert {bad[0]!r}; experts: {', '.join(labels)}",
                                       f"merge.{name}")
                per["weight" if name == "weights" else name] = [float(given.get(k, 0.0)) for k in labels]
            if not per and merge.t is None:
                raise RequestError(400, "merge: give weights (and density, gamma), t, or a recipe", "merge")
            for k, v in enumerate(per.get("density", [])):
                if not 0.0 < v <= 1.0:
                    raise RequestError(400, f"merge.density: {labels[k]}: must lie in (0, 1]", "merge.density")
            method = self.space.cfg.method
            group = {**per} if method != "slerp" else {"t": [0.5 if merge.t is None else float(merge.t)]}
            recipe = {"method": method, "experts": labels, "seed": self.space.seed,
                      "groups": {g: dict(group) for g in self.space.groups}}
            if self.space.cfg.normalize is not None:
                recipe["normalize"] = self.space.cfg.normalize
            return recipe
        if model == "merged":
            if self.default is None:
                raise RequestError(400, "model 'merged' needs merge coefficients ('merge' in the request body) "
                                        "or a served run (serve --run RUN_DIR)", "model")
            return self.default
        if model == "base" or model in labels:
            w = [1.0 if k == model else 0.0 for k in labels]
            return {"method": "task_arithmetic", "experts": labels, "seed": self.space.seed,
                    "groups": {g: {"weight": w} for g in self.space.groups}}
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
        if getattr(tok, "chat_template", None):
            with self.tok_lock:
                ids = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True)
            if isinstance(ids, dict) or hasattr(ids, "input_ids"):  # newer transformers: a BatchEncoding
                ids = ids["input_ids"]
            return list(ids)
        # no chat template (e.g. the tiny LM): the messages' contents, one per line, are the prompt
        return self.prompt_ids("\n".join(m["content"] for m in msgs))


def context_length(model) -> int | None:
    """The longest sequence the model takes, from its config (None: no limit is known)."""
    cfg = model.config
    if hasattr(cfg, "get_text_config"):
        cfg = cfg.get_text_config()
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length", "n_ctx"):
        v = getattr(cfg, key, None)
        if isinstance(v, int) and not isinstance(v, bool) and v > 0:
            return v
    return None


def _finite(logits):
    import torch

    if not bool(torch.isfinite(logits).all()):
        raise RequestError(400, "merge: the merged model's outputs are not finite (NaN or Inf); use smaller "
                                "coefficients", "merge")
    return logits


class Chaos:
    """Injected faults for testing clients: each POST fails with probability `rate`, as one of a 429,
    a 500, a response slower than the client's timeout, or a 200 with a malformed body."""

    KINDS = ("429", "500", "timeout", "malformed")

    def __init__(self, rate: float, seed: int = 0, timeout_s: float = 5.0):
        import random

        self.rate, self.timeout_s, self.rng = rate, timeout_s, random.Random(seed)
        self.lock = threading.Lock()
        self.counts = {"posts": 0, **{k: 0 for k in self.KINDS}}

    def draw(self) -> str | None:
        with self.lock:
            self.counts["posts"] += 1
            if self.rng.random() >= self.rate:
                return None
            kind = self.rng.choice(self.KINDS)
            self.counts[kind] += 1
            return kind


def create_app(host: ModelHost, api_key: str | None = None, chaos: Chaos | None = None):
    import asyncio

    from fastapi import FastAPI, Request
    from fastapi.responses import Response
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse
    from starlette.exceptions import HTTPException as StarletteHTTPException

    app = FastAPI(title="evomerge serve", docs_url=None, redoc_url=None)

    def error(status: int, message: str, param: str | None = None, code: str | None = None) -> JSONResponse:
        kind = {401: "authentication_error", 404: "not_found_error"}.get(status, "invalid_request_error")
        if status >= 500:
            kind = "server_error"
        return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": code}},
                            status_code=status)

    @app.exception_handler(RequestError)
    async def _request_error(request, exc: RequestError):
        return error(exc.status, exc.message, exc.param, exc.code)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid request"}
        if first.get("type") == "json_invalid":
            return error(400, f"the request body is not valid JSON ({first.get('msg')})")
        loc = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        return error(400, f"{loc}: {first.get('msg')}" if loc else str(first.get("msg")), loc or None)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request, exc: StarletteHTTPException):
        return error(exc.status_code, str(exc.detail))

    @app.exception_handler(Exception)
    async def _unexpected(request, exc: Exception):
        return error(500, f"internal error: {type(exc).__name__}: {exc}"[:500])

    @app.middleware("http")
    async def _auth(request: Request, call_next):
        if api_key is not None and request.url.path != "/health":  # liveness needs no key
            got = request.headers.get("authorization", "")
            if not secrets.compare_digest(got.encode(), f"Bearer {api_key}".encode()):
                return error(401, "missing or wrong API key (Authorization: Bearer ...)")
        fault = chaos.draw() if chaos is not None and request.method == "POST" else None
        if fault == "429":
            return error(429, "rate limited (injected)")
        if fault == "500":
            return error(500, "server error (injected)")
        if fault == "malformed":
            return Response('{"choices": [', status_code=200, media_type="application/json")
        if fault == "timeout":
            await asyncio.sleep(chaos.timeout_s)
        try:
            return await call_next(request)
        except Exception as exc:  # noqa: BLE001 - a request never takes the server down
            return error(500, f"internal error: {type(exc).__name__}: {exc}"[:500])

    @app.get("/v1/models")
    def models():
        now = int(time.time())
        return {"object": "list", "data": [{"id": m, "object": "model", "created": now, "owned_by": "evomerge"}
                                           for m in host.model_ids()]}

    @app.get("/health")
    def health():
        return {"status": "ok", **host.stats, **({"chaos": chaos.counts} if chaos else {})}

    def stops(stop) -> list[str]:
        return [] if stop is None else [stop] if isinstance(stop, str) else list(stop)

    @app.post("/v1/completions")
    def completions(req: CompletionRequest):
        recipe = host.recipe(req.model, req.merge)
        prompts = [req.prompt] if isinstance(req.prompt, str) else req.prompt
        if not prompts:
            raise RequestError(400, "prompt: empty list", "prompt")
        choices, usage = [], {"prompt_tokens": 0, "completion_tokens": 0}
        # every prompt is measured against the context before any of them reaches the model
        todo = []
        for i, p in enumerate(prompts):
            ids = host.prompt_ids(p)
            todo.append((ids, host.budget(len(ids), req.max_tokens, "prompt" if len(prompts) == 1 else f"prompt.{i}")))
        for i, (p, (ids, n)) in enumerate(zip(prompts, todo)):
            r = host.complete(recipe, ids, n, req.temperature, req.top_p, stops(req.stop), req.seed, req.logprobs,
                              req.echo)
            text = (p if req.echo else "") + r["text"]
            lp = None
            if req.logprobs is not None:
                ents, offset, offsets = r["entries"], 0, []
                for e in ents:
                    offsets.append(offset)
                    offset += len(e["token"])
                lp = {"tokens": [e["token"] for e in ents], "token_logprobs": [e["logprob"] for e in ents],
                      "top_logprobs": [e["top"] or None for e in ents], "text_offset": offsets}
            choices.append({"index": i, "text": text, "logprobs": lp, "finish_reason": r["finish_reason"]})
            usage["prompt_tokens"] += r["prompt_tokens"]
            usage["completion_tokens"] += r["completion_tokens"]
        usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
        return {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
                "model": req.model, "choices": choices, "usage": usage}

    @app.post("/v1/chat/completions")
    def chat(req: ChatRequest):
        recipe = host.recipe(req.model, req.merge)
        ids = host.chat_prompt(req.messages)
        limit = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        n = host.budget(len(ids), limit, "messages")
        r = host.complete(recipe, ids, n, req.temperature, req.top_p,
                          stops(req.stop), req.seed, req.top_logprobs if req.logprobs else None, False)
        lp = None
        if req.logprobs:
            lp = {"content": [{"token": e["token"], "logprob": e["logprob"], "bytes": list(e["token"].encode()),
                               "top_logprobs": [{"token": t, "logprob": v, "bytes": list(t.encode())}
                                                for t, v in e["top"].items()]} for e in r["entries"]]}
        usage = {"prompt_tokens": r["prompt_tokens"], "completion_tokens": r["completion_tokens"],
                 "total_tokens": r["prompt_tokens"] + r["completion_tokens"]}
        return {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()),
                "model": req.model, "usage": usage,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": r["text"]},
                             "logprobs": lp, "finish_reason": r["finish_reason"]}]}

    return app


def serve_main(argv: list[str]) -> int:
    """`evomerge serve --config X | --run RUN_DIR [--host 127.0.0.1] [--port 8000] [--api-key-env NAME]`."""
    from ..command import prog

    ap = argparse.ArgumentParser(
        prog=prog("serve"), formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Serve a base model and its experts over an OpenAI-compatible HTTP API (GET /v1/models, POST\n"
                    "/v1/completions, POST /v1/chat/completions, GET /health). `model` is 'base', an expert's label\n"
                    "or 'merged' (--run); a request may instead carry merge coefficients (extra body\n"
                    "{\"merge\": {\"weights\": {LABEL: W, ...}}}), merged into the one resident model in place.\n\n"
                    "limits (a 400 answer naming the field, before the request reaches the model):\n"
                    "  prompt tokens (a chat's after its chat template) + max_tokens <= the model's context: its\n"
                    "    config's max_position_embeddings, or --max-context (no max_tokens: 16, or what is left)\n"
                    f"  merge coefficients: finite numbers of magnitude <= {MAX_COEFFICIENT:g}; densities in (0, 1]",
        epilog=f"examples:\n  {prog('serve')} --config configs/tinylm_ties_cmaes.yaml --port 8000\n"
               f"  MY_KEY=secret {prog('serve')} --run runs/a --api-key-env MY_KEY --merge-cache 4")
    ap.add_argument("--config", metavar="YAML", help="a config with an hf_merge space (its models are served)")
    ap.add_argument("--run", metavar="RUN_DIR", help="serve a run's models, with its best merge as model 'merged'")
    ap.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1: this machine only)")
    ap.add_argument("--port", type=int, default=8000, help="port, 1-65535, or 0 for a free one (default 8000)")
    ap.add_argument("--api-key-env", metavar="NAME", help="require 'Authorization: Bearer $NAME' on every request")
    ap.add_argument("--device", default=None, help="resident model device (default: the space's)")
    ap.add_argument("--merge-cache", type=int, default=0, metavar="N",
                    help="keep copies of the last N merges (N model copies of memory; switching back is a copy)")
    ap.add_argument("--max-context", type=int, default=None, metavar="TOKENS",
                    help="the longest prompt + max_tokens served (default: the model's max_position_embeddings)")
    ap.add_argument("--chaos", type=float, default=0.0, metavar="RATE",
                    help="testing clients: fail this fraction of requests (429, 500, timeout, malformed body)")
    ap.add_argument("--chaos-seed", type=int, default=0, help="seed of the injected faults")
    ap.add_argument("--chaos-timeout-s", type=float, default=5.0, help="delay of an injected timeout")
    args = ap.parse_args(argv)
    if not 0 <= args.port <= 65535:
        raise UserError(f"--port {args.port}: must lie in 1..65535 (or 0: a free port)")
    if not 0.0 <= args.chaos <= 1.0:
        raise UserError(f"--chaos {args.chaos}: must lie in [0, 1]")
    if args.merge_cache < 0:
        raise UserError(f"--merge-cache {args.merge_cache}: must be >= 0")
    if args.max_context is not None and args.max_context < 1:
        raise UserError(f"--max-context {args.max_context}: must be >= 1")
    api_key = None
    if args.api_key_env:
        api_key = os.environ.get(args.api_key_env)
        if not api_key:
            raise UserError(f"--api-key-env {args.api_key_env}: the environment variable is not set or empty")
    sock = bind_socket(args.host, args.port)  # a port in use is refused before the model loads
    try:
        host = build_host(args.config, args.run, args.device, args.merge_cache, args.max_context)
        import uvicorn

        sock.listen(2048)
        port = sock.getsockname()[1]
        where = f"[{args.host}]" if ":" in args.host else args.host
        print(f"serving {', '.join(host.model_ids())} on http://{where}:{port}/v1", flush=True)
        chaos = Chaos(args.chaos, args.chaos_seed, args.chaos_timeout_s) if args.chaos > 0 else None
        config = uvicorn.Config(create_app(host, api_key, chaos), log_level="warning")
        uvicorn.Server(config).run(sockets=[sock])
    finally:
        sock.close()
    return 0


def bind_socket(host: str, port: int):
    """A TCP socket bound to host:port (not listening yet), or a UserError naming --host or --port."""
    import errno
    import socket

    try:
        family, kind, proto, _, addr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                          flags=socket.AI_PASSIVE)[0]
    except (socket.gaierror, UnicodeError) as e:
        raise UserError(f"--host {host}: not a host name or address ({getattr(e, 'strerror', None) or e})") from None
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn: a restart need not wait
        sock.bind(addr)
    except OSError as e:
        sock.close()
        if e.errno == errno.EADDRINUSE:
            raise UserError(f"--port {port}: already in use on {host} (another server?); choose another "
                            "port") from None
        if e.errno == errno.EACCES:
            raise UserError(f"--port {port}: permission denied (ports below 1024 need privileges)") from None
        if e.errno == errno.EADDRNOTAVAIL:
            raise UserError(f"--host {host}: not an address of this machine") from None
        raise UserError(f"--port {port}: cannot listen on {host}: {e.strerror or e}") from None
    return sock


def build_host(config: str | None, run: str | None, device: str | None, merge_cache: int = 0,
               max_context: int | None = None) -> ModelHost:
    from ..config import load_config
    from ..export import find_recipe
    from ..spaces import build_space

    if bool(config) == bool(run):
        raise UserError("serve: give --config YAML or --run RUN_DIR")
    default = None
    if run:
        if not (Path(run) / "config.yaml").exists():
            raise UserError(f"--run {run}: not a run directory (no config.yaml)")
        cfg = load_config(Path(run) / "config.yaml")
    else:
        cfg = load_config(config)
    if cfg.space.name != "hf_merge":
        raise UserError(f"space.name: {cfg.space.name}: serve hosts an hf_merge space's base and experts")
    space = build_space(cfg.space, cfg.seed)
    space.prepare()
    if run:
        _, default = find_recipe(Path(run), None)
    return ModelHost(space, default, device, merge_cache, max_context)


class LocalServer:
    """`evomerge serve ARGS` (as `python -m evomerge`, no checkout needed) in a subprocess on a free loopback
    port, up once /health answers (for tests, benchmarks and local searches); a context manager that ends the
    process it started. `cwd` (default: the caller's) is where relative paths in ARGS are read from."""

    def __init__(self, *args: str, env: dict | None = None, python: str | None = None, cwd: str | None = None,
                 start_timeout_s: float = 120.0):
        import socket
        import subprocess
        import sys
        import urllib.request

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.proc = subprocess.Popen([python or sys.executable, "-m", "evomerge", "serve", *args,
                                      "--port", str(self.port)],
                                     cwd=cwd, env={**os.environ, **(env or {})}, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True)
        self.url = f"http://127.0.0.1:{self.port}/v1"
        deadline = time.monotonic() + start_timeout_s
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health", timeout=1)
                return
            except Exception:  # noqa: BLE001 - not up yet
                if self.proc.poll() is not None:
                    raise RuntimeError(f"serve exited: {self.proc.stdout.read()[-2000:]}") from None
                if time.monotonic() > deadline:
                    self.close()
                    raise RuntimeError("serve did not come up") from None
                time.sleep(0.2)

    def health(self) -> dict:
        import urllib.request

        return json.loads(urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health", timeout=10).read())

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except Exception:  # noqa: BLE001 - it would not stop: end it
                self.proc.kill()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
