"""A model's folder of LoRA adapters: which files there are, by the names requests use.

    loras/
      cyan/pytorch_lora_weights.safetensors   -> "cyan" (a folder as diffusers' save_lora_weights
      cyan/README.md                             writes it, with its card)
      pixel-art.safetensors                   -> "pixel-art" (a single file, kohya-style)

Files are read on first use (`sdserve.pipeline.lora.load_lora`), not when listed.
"""

from __future__ import annotations

import re
from pathlib import Path

NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
WEIGHTS = "pytorch_lora_weights.safetensors"


def lora_dir(model_dir: str | Path, configured: str | None = None) -> Path:
    """The adapter folder: the configured one, else `loras/` inside the model folder."""
    return Path(configured).expanduser() if configured else Path(model_dir) / "loras"


def lora_files(folder: str | Path) -> dict[str, Path]:
    """{name: weights file} of the adapters in `folder` (empty when it does not exist)."""
    root = Path(folder)
    if not root.is_dir():
        return {}
    found: dict[str, Path] = {}
    for entry in sorted(root.iterdir()):
        if entry.is_file() and entry.suffix == ".safetensors":
            found[entry.stem] = entry
        elif entry.is_dir():
            files = sorted(entry.glob("*.safetensors"))
            preferred = [f for f in files if f.name == WEIGHTS]
            if preferred or len(files) == 1:
                found[entry.name] = (preferred or files)[0]
    return {name: path for name, path in found.items() if NAME.match(name)}
