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


def generate(model, tok, rows: list[Row], sink=None, join=None) -> list[dict | RequestError]:
    """Continue every row in one batch. Per row: a dict (text, entries, finish_reason, prompt_tokens,
    completion_tokens) or the RequestError that refused it (the model's outputs were not finite), in the
    order of `rows` and then of the rows that joined.

    sink(i, out), if given, gets each row's answer as soon as the row finishes. join(live, width), if given,
    is asked before each step for more rows (of the same merge) to join the running batch, with `live` rows
    in the batch and a KV cache `width` tokens wide: their prompts go through the model in a forward pass
    of their own (left-padded to the longest), then their cache joins the live rows' (the narrower one
    left-padded, masked). It is asked with live == 0 when the batch has drained: rows it returns then
    start afresh; none ends the batch."""
    import torch

    results: list[dict | RequestError | None] = []
    dev = model.device
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    takes = _takes(model)
    cache_kw = "cache" if "cache" in takes else "past_key_values"  # transformers 5 renames past_key_values
    live: list[_State] = []  # the rows in the cache, in its batch order
    cache = mask = pos = last = None  # the KV cache, its attention mask, the live rows' last positions and logits

    def finish(s: _State) -> None:
        out = s.error if s.error is not None else _result(tok, s)
        results[s.index] = out
        if sink is not None:
            sink(s.index, out)

    todo = list(rows)
    with torch.inference_mode():
        while True:
            new = []
            for r in todo:
                st = _State(len(results), r)
                results.append(None)
                if r.max_tokens == 0 and not r.echo:  # nothing to compute
                    finish(st)
                else:
                    new.append(st)
            if live or new:
                lasts = []
                if live:  # one step of the live rows
                    ids = torch.tensor([[st.out[-1]] for st in live], dtype=torch.long, device=dev)
                    mask = torch.cat([mask, mask.new_ones((len(live), 1))], -1)
                    pos = pos + 1
                    out = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True,
                                **{cache_kw: cache})
                    cache = _cache(out)
                    lasts.append(out.logits[:, -1])
                if new:  # the new rows' prompts, left-padded to the longest, in a cache of their own
                    span = max(len(st.row.prompt_ids) for st in new)
                    ids = torch.full((len(new), span), pad, dtype=torch.long)
                    step = torch.zeros_like(ids)
                    for b, st in enumerate(new):
                        n = len(st.row.prompt_ids)
                        ids[b, span - n:] = torch.tensor(st.row.prompt_ids, dtype=torch.long)
                        step[b, span - n:] = 1
                    ids, step = ids.to(dev), step.to(dev)
                    first = (step.cumsum(-1) - 1).clamp(min=0)
                    echo = any(st.row.echo for st in new)
                    kw = {"logits_to_keep": 1} if "logits_to_keep" in takes and not echo else {}
                    out = model(input_ids=ids, attention_mask=step, position_ids=first, use_cache=True, **kw)
                    logits = out.logits
                    lasts.append(logits[:, -1])
                    if live:  # joined to the live rows' cache, both left-padded to the wider
                        mask = _join_caches(cache, mask, _cache(out), step)
                        pos = torch.cat([pos, first[:, -1:]])
                    else:
                        cache, mask, pos = _cache(out), step, first[:, -1:]
                    for b, st in enumerate(new):
                        if st.row.echo:
                            n = len(st.row.prompt_ids)
                            lg = logits[b, logits.shape[1] - n:].float()
                            if not bool(torch.isfinite(lg).all()):
                                st.error, st.done = _not_finite(), True
                                continue
                            lp = torch.log_softmax(lg, -1)
                            for j, t in enumerate(st.row.prompt_ids):
                                st.entries.append(_entry(tok, t, None if j == 0 else lp[j - 1], st.row.logprobs))
                        if st.row.max_tokens == 0:
                            st.done = True
                last = torch.cat(lasts) if len(lasts) > 1 else lasts[0]
                live = live + new
                go = [st for st in live if not st.done]
                if go:
                    _step(tok, go, last[[k for k, st in enumerate(live) if not st.done]].float())
                for st in live:
                    if st.done:
                        finish(st)
                keep = [k for k, st in enumerate(live) if not st.done]
                if len(keep) < len(live):  # finished rows drop out
                    if keep:
                        sel = torch.tensor(keep, dtype=torch.long, device=dev)
                        cache.batch_select_indices(sel)
                        mask, pos = mask[sel], pos[sel]
                        mask = _compact(cache, mask)
                    live = [live[k] for k in keep]
            if not live:
                cache = mask = pos = last = None
            if join is None:
                if not live:
                    break
                todo = []
                continue
            todo = join(len(live), 0 if mask is None else mask.shape[1]) if not live or _joinable(cache) else []
            if not live and not todo:
                break
    return results


def _joinable(cache) -> bool:
    """Whether rows can join this cache (a DynamicCache of plain layers: their tensors can grow in batch)."""
    from transformers.cache_utils import DynamicCache, DynamicLayer

    return isinstance(cache, DynamicCache) and bool(cache.layers) and all(
        type(layer) is DynamicLayer and layer.is_initialized for layer in cache.layers)


def _join_caches(cache, mask, other, other_mask):
    """Append `other`'s rows to `cache` (in place), the narrower left-padded with masked zeros: the mask."""
    import torch

    wide = max(mask.shape[1], other_mask.shape[1])

    def left(t, n):  # t: (rows, heads, seq, dim) -> seq n
        return t if t.shape[-2] == n else torch.cat([t.new_zeros((*t.shape[:-2], n - t.shape[-2], t.shape[-1])), t],
                                                    -2)

    for layer, extra in zip(cache.layers, other.layers):
        layer.keys = torch.cat([left(layer.keys, wide), left(extra.keys, wide)])
        layer.values = torch.cat([left(layer.values, wide), left(extra.values, wide)])

    def pad(m):
        return m if m.shape[1] == wide else torch.cat([m.new_zeros((m.shape[0], wide - m.shape[1])), m], 1)

    return torch.cat([pad(mask), pad(other_mask)])


def _compact(cache, mask):
    """Drop the cache's columns no live row attends to (once a quarter of it): the mask, compacted."""
    used = mask.any(0)
    if not _joinable(cache) or int((~used).sum()) * 4 < mask.shape[1]:
        return mask
    for layer in cache.layers:
        layer.keys, layer.values = layer.keys[:, :, used], layer.values[:, :, used]
    return mask[:, used]


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
