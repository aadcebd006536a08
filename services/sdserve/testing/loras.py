"""Random LoRA files for tests: diffusers/PEFT format or kohya format, for a given model.

`write_random_lora` targets every nn.Linear / nn.Conv2d whose module name ends with one of
`targets` (PEFT's rule for `target_modules`), with random factors large enough that the adapter
visibly changes the tiny model's image. Conv2d layers get LoCon factors: a down convolution with
the layer's kernel and a 1x1 up convolution.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from sdserve.pipeline.lora_layers import base_layer

UNET_ATTENTION = ("to_q", "to_k", "to_v", "to_out.0")
TEXT_ATTENTION = ("q_proj", "k_proj", "v_proj", "out_proj")


def _targeted(model, targets: Sequence[str]) -> dict[str, torch.nn.Module]:
    """{module name: layer} of the model's Linear/Conv2d layers named by `targets`."""
    found = {}
    for name, module in model.named_modules():
        layer = base_layer(module)
        if name.endswith(".base") or not isinstance(layer, torch.nn.Linear | torch.nn.Conv2d):
            continue
        if any(name == t or name.endswith("." + t) for t in targets):
            found[name] = layer
    if not found:
        raise ValueError(f"no Linear or Conv2d module matches {tuple(targets)}")
    return found


def _factors(layer, rank: int, scale_of_weights: float, generator: torch.Generator):
    """(down, up): down ~ N(0, 1 / fan_in), up ~ N(0, scale_of_weights^2 / rank), so that
    up(down(x)) is about scale_of_weights times as large as x."""
    weight = layer.weight
    out_dim, in_dim = weight.shape[:2]
    kernel = tuple(weight.shape[2:])
    fan_in = in_dim * (kernel[0] * kernel[1] if kernel else 1)
    down = torch.randn((rank, in_dim, *kernel), generator=generator) / fan_in**0.5
    up = torch.randn((out_dim, rank, *((1, 1) if kernel else ())), generator=generator)
    return down, up * scale_of_weights / rank**0.5


def write_random_lora(
    unet,
    path: str | Path,
    *,
    seed: int,
    rank: int = 4,
    targets: Sequence[str] = UNET_ATTENTION,
    text_encoder=None,
    text_targets: Sequence[str] = TEXT_ATTENTION,
    kohya: bool = False,
    alpha: float | None = None,
    scale_of_weights: float = 1.0,
) -> Path:
    """Writes a random LoRA for `unet` (and `text_encoder` when given) to `path`.

    Args:
        targets: U-Net module name suffixes to adapt (Linear or Conv2d).
        text_targets: text-encoder module name suffixes (with `text_encoder`).
        kohya: kohya's layout (`lora_unet_<name with underscores>.lora_down.weight`,
            `.lora_up.weight`, `.alpha`; `lora_te_text_model_...` for the text encoder) instead
            of diffusers' (`unet.<name>.lora_A.weight`, `.lora_B.weight`, written by
            `StableDiffusionPipeline.save_lora_weights` with the PEFT config as metadata).
        alpha: LoRA alpha (the update is scaled by alpha / rank); None: rank.
        scale_of_weights: how large the update is relative to a layer's input.

    Returns:
        `path`.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(seed)
    alpha = float(rank if alpha is None else alpha)
    models = {"unet": (unet, targets), "text_encoder": (text_encoder, text_targets)}
    parts = {
        part: {n: _factors(m, rank, scale_of_weights, generator)
               for n, m in _targeted(model, names).items()}
        for part, (model, names) in models.items()
        if model is not None
    }  # fmt: skip
    if kohya:
        _write_kohya(path, parts, alpha)
    else:
        _write_diffusers(path, parts, rank, alpha)
    return path


def _write_kohya(path: Path, parts: dict, alpha: float) -> None:
    from safetensors.torch import save_file

    tensors = {}
    for part, factors in parts.items():
        for name, (down, up) in factors.items():
            if part == "unet":
                key = "lora_unet_" + name.replace(".", "_")
            else:  # kohya names the text encoder's modules as in transformers 4
                full = name if name.startswith("text_model.") else "text_model." + name
                key = "lora_te_" + full.replace(".", "_")
            tensors[f"{key}.lora_down.weight"] = down.contiguous()
            tensors[f"{key}.lora_up.weight"] = up.contiguous()
            tensors[f"{key}.alpha"] = torch.tensor(alpha)
    save_file(tensors, str(path), metadata={"ss_network_module": "networks.lora"})


def _write_diffusers(path: Path, parts: dict, rank: int, alpha: float) -> None:
    from diffusers import StableDiffusionPipeline

    layers, metadata = {}, {}
    for part, factors in parts.items():
        layers[part] = {}
        for name, (down, up) in factors.items():
            layers[part][f"{name}.lora_A.weight"] = down.contiguous()
            layers[part][f"{name}.lora_B.weight"] = up.contiguous()
        metadata[part] = {"r": rank, "lora_alpha": alpha, "target_modules": sorted(factors)}
    StableDiffusionPipeline.save_lora_weights(
        path.parent,
        unet_lora_layers=layers["unet"],
        text_encoder_lora_layers=layers.get("text_encoder"),
        weight_name=path.name,
        unet_lora_adapter_metadata=metadata["unet"],
        text_encoder_lora_adapter_metadata=metadata.get("text_encoder"),
    )
