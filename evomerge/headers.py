"""What a model's tensors are (names, shapes, safetensors dtypes), from safetensors headers or its
config.json: no weights read, no torch.

`model_tensors(path)` reads `model.safetensors` or the shards of `model.safetensors.index.json`; a
directory with only `config.json` has its tensors derived from the config (Llama, Mistral, Qwen2), so a
memory plan can be made for a model that is not downloaded.
"""
from __future__ import annotations

import json
import os
import struct
from pathlib import Path

from .errors import UserError

MIB = 2 ** 20
ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")


# safetensors dtypes ---------------------------------------------------------------------------

DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1,
               "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U64": 8, "U32": 4, "U16": 2, "U8": 1, "BOOL": 1}
FLOATING = ("F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2")
NAMES = {"float64": "F64", "float32": "F32", "float16": "F16", "bfloat16": "BF16"}  # torch name -> safetensors


def st_dtype(name: str) -> str | None:
    """"bfloat16" / "torch.bfloat16" -> "BF16"; "auto" -> None (each tensor keeps its own)."""
    name = str(name).removeprefix("torch.")
    if name == "auto":
        return None
    if name not in NAMES:
        raise ValueError(f"dtype {name}: not one of {', '.join(NAMES)} or auto")
    return NAMES[name]


def nbytes(shape: tuple[int, ...], dtype: str) -> int:
    n = DTYPE_BYTES[dtype]
    for d in shape:
        n *= d
    return n


def numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


# the tensors of a model, from headers or its config -----------------------------------------------

def model_tensors(path: str | Path) -> dict[str, tuple[tuple[int, ...], str]]:
    """name -> (shape, safetensors dtype) of a model directory, in checkpoint order, reading only the
    safetensors headers (`model.safetensors`, or the shards of `model.safetensors.index.json`); a
    directory with only `config.json` has its tensors derived from the config (Llama, Mistral, Qwen2)."""
    p = Path(path)
    index, single, config = p / "model.safetensors.index.json", p / "model.safetensors", p / "config.json"
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
            if not isinstance(weight_map, dict):
                raise TypeError("weight_map is not a mapping")
        except (ValueError, KeyError, TypeError) as e:
            raise UserError(f"{index}: not a safetensors index ({e})") from None
        headers: dict[str, dict] = {}
        out = {}
        for name, shard in weight_map.items():
            file = p / shard
            if shard not in headers:
                if not file.exists():
                    raise UserError(f"{p}: shard {file} listed in the index does not exist")
                headers[shard] = read_header(file)
            if name not in headers[shard]:
                raise UserError(f"{file}: no tensor {name}, which {index.name} places there")
            out[name] = headers[shard][name]
        return out
    if single.exists():
        return read_header(single)
    if config.exists():
        return config_tensors(config)
    raise UserError(f"{p}: no model.safetensors, model.safetensors.index.json or config.json")


def read_header(file: str | Path) -> dict[str, tuple[tuple[int, ...], str]]:
    """name -> (shape, dtype) from a safetensors file's header (8-byte little-endian length, then JSON)."""
    file = Path(file)
    try:
        with open(file, "rb") as f:
            head = f.read(8)
            size = os.fstat(f.fileno()).st_size
            if len(head) < 8:
                raise UserError(f"{file}: not a safetensors file (shorter than its 8-byte header length)")
            (n,) = struct.unpack("<Q", head)
            if n > size - 8 or n > 100 * MIB:
                raise UserError(f"{file}: not a safetensors file (a header of {n} bytes in a file of {size})")
            raw = f.read(n)
    except OSError as e:
        raise UserError(f"{file}: cannot read ({e.strerror or e})") from None
    try:
        header = json.loads(raw)
        if not isinstance(header, dict):
            raise ValueError("the header is not a JSON object")
        out = {}
        for name, meta in header.items():
            if name == "__metadata__":
                continue
            dtype, shape = meta["dtype"], tuple(int(d) for d in meta["shape"])
            if dtype not in DTYPE_BYTES:
                raise ValueError(f"tensor {name}: dtype {dtype} is not known here")
            out[name] = (shape, dtype)
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise UserError(f"{file}: not a safetensors header ({e})") from None
    return out


def config_tensors(config: str | Path) -> dict[str, tuple[tuple[int, ...], str]]:
    """The tensors a LlamaForCausalLM / MistralForCausalLM / Qwen2ForCausalLM checkpoint of this config.json
    holds, as Hugging Face names them (tied embeddings: no lm_head; rotary inv_freq is not stored)."""
    config = Path(config)
    try:
        c = json.loads(config.read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"{config}: not a readable JSON config ({e})") from None
    if not isinstance(c, dict):
        raise UserError(f"{config}: not a JSON object")
    archs = c.get("architectures") or []
    arch = next((a for a in archs if a in ARCHITECTURES), None)
    if arch is None:
        named = ", ".join(map(str, archs)) or f"model_type {c.get('model_type')}"
        raise UserError(f"{config}: no weights beside it, and its architecture ({named}) cannot be planned from "
                        f"the config alone; supported: {', '.join(ARCHITECTURES)}")
    try:
        dtype = st_dtype(c.get("torch_dtype") or c.get("dtype") or "float32") or "F32"
        h, inter, layers = int(c["hidden_size"]), int(c["intermediate_size"]), int(c["num_hidden_layers"])
        heads, vocab = int(c["num_attention_heads"]), int(c["vocab_size"])
        kv = int(c.get("num_key_value_heads") or heads)
        hd = int(c.get("head_dim") or h // heads)
    except KeyError as e:
        raise UserError(f"{config}: no {e.args[0]}") from None
    except (ValueError, TypeError) as e:
        raise UserError(f"{config}: {e}") from None
    tied = bool(c.get("tie_word_embeddings", False))
    qkv_bias = arch == "Qwen2ForCausalLM" or bool(c.get("attention_bias", False))
    o_bias = arch != "Qwen2ForCausalLM" and bool(c.get("attention_bias", False))
    mlp_bias = arch == "LlamaForCausalLM" and bool(c.get("mlp_bias", False))
    out = {"model.embed_tokens.weight": ((vocab, h), dtype)}
    for i in range(layers):
        a, m = f"model.layers.{i}.self_attn", f"model.layers.{i}.mlp"
        for proj, rows in (("q_proj", heads * hd), ("k_proj", kv * hd), ("v_proj", kv * hd)):
            out[f"{a}.{proj}.weight"] = ((rows, h), dtype)
            if qkv_bias:
                out[f"{a}.{proj}.bias"] = ((rows,), dtype)
        out[f"{a}.o_proj.weight"] = ((h, heads * hd), dtype)
        if o_bias:
            out[f"{a}.o_proj.bias"] = ((h,), dtype)
        for proj, shape in (("gate_proj", (inter, h)), ("up_proj", (inter, h)), ("down_proj", (h, inter))):
            out[f"{m}.{proj}.weight"] = (shape, dtype)
            if mlp_bias:
                out[f"{m}.{proj}.bias"] = ((shape[0],), dtype)
        out[f"model.layers.{i}.input_layernorm.weight"] = ((h,), dtype)
        out[f"model.layers.{i}.post_attention_layernorm.weight"] = ((h,), dtype)
    out["model.norm.weight"] = ((h,), dtype)
    if not tied:
        out["lm_head.weight"] = ((vocab, h), dtype)
    return out
