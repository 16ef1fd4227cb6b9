"""Tiny random Llama checkpoints with a real (locally built) tokenizer, for tests that need HF models."""
from pathlib import Path

import torch


def tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(["<pad>", "<unk>", "<s>", "</s>", *"abcdefghijklmnopqrstuvwxyz0123456789+= "])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", bos_token="<s>",
                                   eos_token="</s>")


def tiny_family(root: Path, experts=("a", "b", "c"), seed: int = 0) -> tuple[Path, dict[str, Path]]:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    tok = tokenizer()
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64,
                      tie_word_embeddings=False)
    base = LlamaForCausalLM(cfg)
    base_dir = root / "base"
    base.save_pretrained(base_dir)
    tok.save_pretrained(base_dir)
    paths = {}
    for i, label in enumerate(experts):
        m = LlamaForCausalLM(cfg)
        m.load_state_dict(base.state_dict())
        with torch.no_grad():
            for p in m.parameters():
                p.add_(torch.randn_like(p) * 0.02 * (i + 1))
        paths[label] = root / label
        m.save_pretrained(paths[label])
        tok.save_pretrained(paths[label])
    return base_dir, paths
