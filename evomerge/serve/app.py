"""The FastAPI app of `evomerge serve`: OpenAI's routes over a ModelHost, OpenAI's error body for every
refusal, the API key check and the injected faults."""
from __future__ import annotations

import secrets
import time
import uuid

from ..wire import ChatRequest, CompletionRequest, RequestError
from .batch import Row
from .faults import Chaos
from .host import ModelHost


def create_app(host: ModelHost, api_key: str | None = None, chaos: Chaos | None = None):
    """The app serving `host`: every request but GET /health needs `api_key` when one is given; `chaos`
    (optional) fails a fraction of the POSTs."""
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
        return {"status": "ok", **host.health(), **({"chaos": chaos.counts} if chaos else {})}

    @app.post("/v1/completions")
    def completions(req: CompletionRequest):
        recipe = host.recipe(req.model, req.merge)
        prompts = [req.prompt] if isinstance(req.prompt, str) else req.prompt
        if not prompts:
            raise RequestError(400, "prompt: empty list", "prompt")
        choices, usage = [], {"prompt_tokens": 0, "completion_tokens": 0}
        # every prompt is measured against the context before any of them reaches the model
        rows = []
        for i, p in enumerate(prompts):
            ids = host.prompt_ids(p)
            n = host.budget(len(ids), req.max_tokens, "prompt" if len(prompts) == 1 else f"prompt.{i}")
            rows.append(Row(ids, n, req.temperature, req.top_p, req.stops(), req.seed, req.logprobs, req.echo))
        for i, (p, r) in enumerate(zip(prompts, host.generate(recipe, rows))):
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
        r = host.generate(recipe, [Row(ids, n, req.temperature, req.top_p, req.stops(), req.seed,
                                       (req.top_logprobs or 0) if req.logprobs else None, False)])[0]
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

