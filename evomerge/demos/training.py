"""Training the tiny-LM family: the character-level tokenizer, batches of '<s>prompt answer</s>' sequences,
the AdamW loop, and the progress lines of a build."""
from __future__ import annotations

import random
import string
import time

SPECIALS = ["<pad>", "<s>", "</s>", "<unk>"]
ALPHABET = string.ascii_lowercase + string.ascii_uppercase + string.digits + " +=-,:"


def build_tokenizer(corpus: list[str]):
    """A character-level Hugging Face fast tokenizer: one token per character, BOS prepended.

    The vocabulary is the special tokens, then the fixed ALPHABET, then any other character of the
    corpus (sorted), so it is the same for every seed.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    chars = list(ALPHABET) + sorted({c for line in corpus for c in line} - set(ALPHABET))
    vocab = {t: i for i, t in enumerate(SPECIALS + chars)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", vocab["<s>"])])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>", unk_token="<unk>", model_max_length=64)


class Stream:
    """Training batches: (input_ids, attention_mask, labels) of B sequences '<s>prompt answer</s>'."""

    def __init__(self, tokenizer, sample, rng: random.Random, batch: int, exclude: set[str],
                 answer_only: bool):
        self.tok, self.sample, self.rng, self.batch = tokenizer, sample, rng, batch
        self.exclude, self.answer_only = exclude, answer_only
        self.vocab = tokenizer.get_vocab()

    def next(self):
        import torch

        seqs, starts = [], []
        while len(seqs) < self.batch:
            prompt, answer = self.sample(self.rng)
            if prompt in self.exclude:
                continue
            ids = [self.tok.bos_token_id] + [self.vocab[c] for c in prompt + answer] + [self.tok.eos_token_id]
            seqs.append(ids)
            starts.append(1 + len(prompt))
        width = max(map(len, seqs))
        ids = torch.full((len(seqs), width), self.tok.pad_token_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        labels = torch.full_like(ids, -100)
        for i, (q, s) in enumerate(zip(seqs, starts)):
            ids[i, :len(q)] = torch.tensor(q)
            mask[i, :len(q)] = 1
            first = s if self.answer_only else 1
            labels[i, first:len(q)] = ids[i, first:len(q)]
        return ids, mask, labels


def train(model, stream: Stream, steps: int, lr: float, warmup: int = 20, on_step=None) -> float:
    """AdamW over `steps` batches; on_step(k) after step k when given (a progress report)."""
    import torch

    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0, betas=(0.9, 0.98))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * max(0.05, 1 - s / steps))
    loss = torch.tensor(0.0)
    for k in range(steps):
        ids, mask, labels = stream.next()
        # right padding: pads only follow the text and carry no labels, so no mask is needed
        loss = model(input_ids=ids, labels=labels).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if on_step is not None:
            on_step(k + 1)
    model.eval()
    return float(loss.detach())


def duration(s: float) -> str:
    s = max(0, round(s))
    return f"{s} s" if s < 60 else f"{s // 60} min {s % 60:02d} s"


class Progress:
    """Progress lines (what is trained, k of n, time so far, a rough time left from the steps/s so far)
    through `say`; a line every `every_s` seconds inside a model's training. Costs a clock read a step."""

    def __init__(self, say, total_steps: int, every_s: float = 15.0):
        self.say, self.total, self.every_s = say, total_steps, every_s
        self.t0 = time.perf_counter()
        self.done_steps, self.train_s = 0, 0.0

    def left(self) -> str:
        if not self.done_steps:
            return ""
        rate = self.train_s / self.done_steps
        return f"; about {duration((self.total - self.done_steps) * rate)} of training left"

    def model(self, k: int, n: int, what: str, steps: int, label: str | None = None):
        """Report the start of model k of n (`label`: its short name in the lines while it trains);
        returns the on_step callback for its training."""
        self.say(f"zoo: [{k}/{n}] training {what}: {steps} steps ({duration(time.perf_counter() - self.t0)} "
                 f"so far{self.left()})")
        start = last = time.perf_counter()

        def on_step(i: int):
            nonlocal last
            now = time.perf_counter()
            if i == steps:
                self.done_steps += steps
                self.train_s += now - start
            elif now - last >= self.every_s:
                last = now
                rate = (now - start) / i
                self.say(f"zoo:   {label or what}: step {i}/{steps}, about {duration((steps - i) * rate)} left for it")
        return on_step
