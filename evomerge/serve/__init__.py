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

Requests that arrive together for the same merge are answered together: one batched generation over
their prompts (a multi-prompt completion's too), at most --max-batch-rows rows (default 32) and
--max-batch-tokens padded tokens; rows of that merge arriving meanwhile join the running batch, and each
is answered as soon as it finishes. A request for another merge waits its turn (FIFO by merge). GET
/health counts requests, merges, batches, batched_rows, joined_rows, largest_batch, busy_s and queued.

The package: `evomerge.wire` (the request schema, shared with the API fitness), `host` (ModelHost: the
resident model, its merge cache, the batch scheduler), `batch` (batched generation), `app` (the FastAPI
routes), `faults` (Chaos, injected faults), `harness` (LocalServer: a server in a subprocess, for tests and
benchmarks) and, here, the command line (serve_main).
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path

from ..errors import UserError
from ..wire import MAX_COEFFICIENT
from .app import create_app
from .faults import Chaos
from .host import MAX_BATCH_ROWS, MAX_BATCH_TOKENS, ModelHost


def serve_main(argv: list[str]) -> int:
    """`evomerge serve --config X | --run RUN_DIR [--host 127.0.0.1] [--port 8000] [--api-key-env NAME]
    [--max-batch-rows N] [--max-batch-tokens T]`."""
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
    ap.add_argument("--max-batch-rows", type=int, default=MAX_BATCH_ROWS, metavar="N",
                    help="requests (prompts) for the same merge generated together, at most "
                         f"(default {MAX_BATCH_ROWS})")
    ap.add_argument("--max-batch-tokens", type=int, default=MAX_BATCH_TOKENS, metavar="TOKENS",
                    help="a batch's rows x (longest prompt + most new tokens), at most; a lone request always "
                         f"goes (default {MAX_BATCH_TOKENS})")
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
    if args.max_batch_rows < 1:
        raise UserError(f"--max-batch-rows {args.max_batch_rows}: must be >= 1")
    if args.max_batch_tokens < 1:
        raise UserError(f"--max-batch-tokens {args.max_batch_tokens}: must be >= 1")
    if args.max_context is not None and args.max_context < 1:
        raise UserError(f"--max-context {args.max_context}: must be >= 1")
    api_key = None
    if args.api_key_env:
        api_key = os.environ.get(args.api_key_env)
        if not api_key:
            raise UserError(f"--api-key-env {args.api_key_env}: the environment variable is not set or empty")
    sock = bind_socket(args.host, args.port)  # a port in use is refused before the model loads
    try:
        host = build_host(args.config, args.run, args.device, args.merge_cache, args.max_context,
                          args.max_batch_rows, args.max_batch_tokens)
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
        why = (e.strerror if isinstance(e, OSError) else None) or e
        raise UserError(f"--host {host}: not a host name or address ({why})") from None
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
               max_context: int | None = None, max_batch_rows: int = MAX_BATCH_ROWS,
               max_batch_tokens: int = MAX_BATCH_TOKENS) -> ModelHost:
    """The ModelHost of a config's hf_merge space (--config), or of a run's, with the run's best recipe as
    model 'merged' (--run); a UserError for anything else."""
    from ..config import load_config
    from ..rundir import config_file, find_recipe
    from ..spaces import build_space

    if bool(config) == bool(run):
        raise UserError("serve: give --config YAML or --run RUN_DIR")
    default = None
    if run:
        cfg = load_config(config_file(run, f"--run {run}"))
    else:
        cfg = load_config(config)
    if cfg.space.name != "hf_merge":
        raise UserError(f"space.name: {cfg.space.name}: serve hosts an hf_merge space's base and experts")
    space = build_space(cfg.space, cfg.seed)
    space.prepare()
    if run:
        _, default = find_recipe(Path(run), None)
    return ModelHost(space, default, device, merge_cache, max_context, max_batch_rows, max_batch_tokens)
