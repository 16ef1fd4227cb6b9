"""Files the user names, read with one-line errors; files the project writes with the permissions any
other file of a run or model directory has.

safetensors >= 0.8 writes through a temporary file created 0600 whatever the umask and renames it
into place (safetensors issue #782), so its files, `save_pretrained`'s included, would be readable by
their owner only. `save_safetensors` and `plain_mode` give them what a plain open() would: 0666 less
the umask (0644 under umask 022)."""
from __future__ import annotations

import os
from pathlib import Path

from .errors import UserError

BOM = b"\xef\xbb\xbf"


def read_utf8(path: str | Path, prefix: str, kind: str, bom: bool = True) -> str:
    """The text of a UTF-8 file the user named. UserError `<prefix><path>: ...` naming the line for a
    missing, unreadable or non-UTF-8 file, a directory, and (unless `bom`) a byte-order mark."""
    p = Path(path)
    try:
        raw = p.read_bytes()
    except FileNotFoundError:
        raise UserError(f"{prefix}{p}: no such {kind}") from None
    except IsADirectoryError:
        raise UserError(f"{prefix}{p}: is a directory, not a {kind}") from None
    except OSError as e:
        raise UserError(f"{prefix}{p}: cannot read: {e.strerror}") from None
    if not bom and raw.startswith(BOM):
        raise UserError(f"{prefix}{p}: starts with a UTF-8 byte-order mark (BOM); save it as UTF-8 without one")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[:e.start].count(b"\n") + 1
        raise UserError(f"{prefix}{p}: line {line}: not UTF-8 text (byte 0x{raw[e.start]:02x}); save the {kind} "
                        "as UTF-8") from None


def plain_mode(*files: Path) -> None:
    mode = 0o666 & ~_umask()
    for f in files:
        os.chmod(f, mode)


def save_safetensors(tensors: dict, path: Path, metadata: dict | None = None) -> None:
    """safetensors.torch.save_file, then the umask's permissions."""
    from safetensors.torch import save_file

    save_file(tensors, str(path), metadata=metadata)
    plain_mode(Path(path))


def save_pretrained(model, tokenizer, directory: Path) -> None:
    """A Hugging Face model directory (safetensors weights, config, tokenizer), the umask's permissions."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory, safe_serialization=True)
    tokenizer.save_pretrained(directory)
    plain_mode(*directory.glob("*.safetensors"))


def _umask() -> int:
    try:  # Linux: read it without changing it (os.umask sets it, a race with other threads)
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


_ST_DTYPES = {"float64": "F64", "float32": "F32", "float16": "F16", "bfloat16": "BF16", "int64": "I64",
              "int32": "I32", "int16": "I16", "int8": "I8", "uint8": "U8", "bool": "BOOL"}


def write_safetensors(path: Path, specs: list[tuple[str, tuple, object]], produce) -> None:
    """A safetensors file written one tensor at a time: specs = [(name, shape, torch dtype)] in file
    order, produce(name) -> the tensor. Peak memory is one tensor, not the file (safetensors' own
    writer takes them all at once). The umask's permissions."""
    import json
    import struct

    import torch

    header, offset = {}, 0
    for name, shape, dtype in specs:
        size = torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()
        header[name] = {"dtype": _ST_DTYPES[str(dtype).replace("torch.", "")], "shape": list(shape),
                        "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for name, shape, dtype in specs:
            t = produce(name)
            if tuple(t.shape) != tuple(shape) or t.dtype != dtype:
                raise ValueError(f"{name}: produced {tuple(t.shape)} {t.dtype}, declared {tuple(shape)} {dtype}")
            f.write(t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    plain_mode(Path(path))
