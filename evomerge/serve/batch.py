"""Batched generation: the rows of one batch (prompts for the same merge) continue together, one forward
pass per step over every row still generating.

Prompts are left-padded to the longest, with an attention mask and position ids counted from each row's
first real token, so a row sees exactly the tokens it would see alone; the KV cache is kept across steps.
Each row keeps its own max_tokens, stop strings, end-of-sequence, temperature, top_p, seed, logprobs
and echo; a row that finishes drops out of the batch (its cache rows are dropped with it). A greedy row
gets the text and logprobs it gets alone, up to float rounding of the batched matrix products.
"""
from __future__ import annotations

import inspect
import secrets
from dataclasses import dataclass, field

from ..wire import RequestError


@dataclass
class Row:
    """One prompt to continue: its token ids and how (top-k `logprobs`: None for no logprobs)."""

    prompt_ids: list[int]
    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    logprobs: int | None = None
    echo: bool = False


class _State:
    """A row while it generates: the tokens so far, their logprob entries, how it ended."""

    def __init__(self, index: int, row: Row):
        self.index, self.row = index, row
        self.out: list[int] = []
        self.entries: list[dict] = []
        self.finish = "length"
        self.error: RequestError | None = None
        self.done = False
        self.gen = None
        if row.temperature != 0:
            import torch

            self.gen = torch.Generator(device="cpu").manual_seed(
                row.seed if row.seed is not None else secrets.randbits(62))


def generate(model, tok, rows: list[Row]) -> list[dict | RequestError]:
    """Continue every row in one batch. Per row: a dict (text, entries, finish_reason, prompt_tokens,
    completion_tokens) or the RequestError that refused it (the model's outputs were not finite)."""
    import torch

    results: list[dict | RequestError | None] = [None] * len(rows)
    states = []
    for i, r in enumerate(rows):
        if r.max_tokens == 0 and not r.echo:  # nothing to compute
            results[i] = _result(tok, _State(i, r))
        else:
            states.append(_State(i, r))
    if not states:
        return results
    dev = model.device
    width = max(len(s.row.prompt_ids) for s in states)
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    ids = torch.full((len(states), width), pad, dtype=torch.long)
    mask = torch.zeros((len(states), width), dtype=torch.long)
    for b, s in enumerate(states):
        n = len(s.row.prompt_ids)
        ids[b, width - n:] = torch.tensor(s.row.prompt_ids, dtype=torch.long)
        mask[b, width - n:] = 1
    ids, mask = ids.to(dev), mask.to(dev)
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    echo = any(s.row.echo for s in states)
    generating = any(s.row.max_tokens > 0 for s in states)
    takes = _takes(model)
    kw = {"logits_to_keep": 1} if "logits_to_keep" in takes and not echo else {}
    cache_kw = "cache" if "cache" in takes else "past_key_values"  # transformers 5 renames past_key_values
    with torch.inference_mode():
        out = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=generating, **kw)
        logits = out.logits
        for b, s in enumerate(states):
            if s.row.echo:
                n = len(s.row.prompt_ids)
                lg = logits[b, width - n:].float()
                if not bool(torch.isfinite(lg).all()):
                    s.error, s.done = _not_finite(), True
                    continue
                lp = torch.log_softmax(lg, -1)
                for j, t in enumerate(s.row.prompt_ids):
                    s.entries.append(_entry(tok, t, None if j == 0 else lp[j - 1], s.row.logprobs))
            if s.row.max_tokens == 0:
                s.done = True
        cache = _cache(out) if generating else None
        last = logits[:, -1]
        active = list(range(len(states)))  # the batch rows of `last`, the cache and the mask
        while True:
            keep = [k for k, b in enumerate(active) if not states[b].done]
            if not keep:
                break
            if len(keep) < len(active):  # finished rows drop out
                sel = torch.tensor(keep, dtype=torch.long, device=dev)
                cache.batch_select_indices(sel)
                mask, pos, last = mask[sel], pos[sel], last[sel]
                active = [active[k] for k in keep]
            _step(tok, [states[b] for b in active], last.float())
            if all(states[b].done for b in active):
                break
            nxt = torch.tensor([[states[b].out[-1] if states[b].out else pad] for b in active], dtype=torch.long,
                               device=dev)
            mask = torch.cat([mask, mask.new_ones((len(active), 1))], -1)
            pos = pos[:, -1:] + 1
            out = model(input_ids=nxt, attention_mask=mask, position_ids=pos, use_cache=True, **{cache_kw: cache})
            cache, last = _cache(out), out.logits[:, -1]
    for s in states:
        results[s.index] = s.error if s.error is not None else _result(tok, s)
    return results


def _step(tok, states: list[_State], logits) -> None:
    """Choose each live row's next token from its logits (one row of `logits` per state)."""
    import torch

    finite = torch.isfinite(logits).all(-1).tolist()
    lp = torch.log_softmax(logits, -1)
    greedy = torch.argmax(logits, -1).tolist()
    eos = tok.eos_token_id
    for k, s in enumerate(states):
        if s.done:
            continue
        if not finite[k]:
            s.error, s.done = _not_finite(), True
            continue
        r = s.row
        if r.temperature == 0:
            nxt = greedy[k]
        else:
            probs = torch.softmax(logits[k] / r.temperature, -1).cpu()
            if r.top_p < 1.0:
                sp, si = torch.sort(probs, descending=True)
                cut = torch.cumsum(sp, 0) - sp < r.top_p
                probs = torch.zeros_like(probs).scatter_(0, si[cut], sp[cut])
            nxt = int(torch.multinomial(probs / probs.sum(), 1, generator=s.gen))
        if eos is not None and nxt == eos:
            s.finish, s.done = "stop", True
            continue
        s.out.append(nxt)
        if r.logprobs is not None:
            s.entries.append(_entry(tok, nxt, lp[k], r.logprobs))
        if r.stop:
            text = tok.decode(s.out, skip_special_tokens=True)
            if any(x in text for x in r.stop):
                s.finish, s.done = "stop", True
                continue
        if len(s.out) >= r.max_tokens:
            s.done = True


def _result(tok, s: _State) -> dict:
    text = tok.decode(s.out, skip_special_tokens=True)
    for x in s.row.stop:
        if x in text:
            text = text[:text.index(x)]
    return {"text": text, "entries": s.entries, "finish_reason": s.finish,
            "prompt_tokens": len(s.row.prompt_ids), "completion_tokens": len(s.out)}


def _entry(tok, token: int, lp, top_k: int | None) -> dict:
    e = {"token": tok.decode([token]), "logprob": None if lp is None else float(lp[token]), "top": {}}
    if lp is not None and top_k:
        vals, idx = lp.topk(top_k)
        e["top"] = {tok.decode([int(i)]): float(v) for v, i in zip(vals.tolist(), idx.tolist())}
    return e


def _not_finite() -> RequestError:
    return RequestError(400, "merge: the merged model's outputs are not finite (NaN or Inf); use smaller "
                             "coefficients", "merge")


_TAKES: dict[type, frozenset] = {}


def _takes(model) -> frozenset:
    """The keyword arguments the model's forward names (logits_to_keep: the prefill projects only the last
    position; cache or past_key_values)."""
    kind = type(model)
    if kind not in _TAKES:
        _TAKES[kind] = frozenset(inspect.signature(model.forward).parameters)
    return _TAKES[kind]


def _cache(out):
    """The KV cache a forward pass returned (`cache` in transformers 5, `past_key_values` before)."""
    cache = out.get("cache")
    return cache if cache is not None else out.past_key_values
