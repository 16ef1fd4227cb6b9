"""Files the project writes with the permissions any other file of a run or model directory has.

safetensors >= 0.8 writes through a temporary file created 0600 whatever the umask and renames it
into place (safetensors issue #782), so its files, `save_pretrained`'s included, would be readable by
their owner only. `save_safetensors` and `plain_mode` give them what a plain open() would: 0666 less
the umask (0644 under umask 022)."""
from __future__ import annotations

import os
from pathlib import Path


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
