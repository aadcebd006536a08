"""Random-weight ControlNets for the tiny models (`sdserve make-tiny-model --arch
tiny-controlnet` / `tiny-sdxl-controlnet`), in a model's `controlnets/` folder.

A ControlNet made with `ControlNetModel.from_unet` copies the U-Net's encoder and starts its
"zero convolutions" at zero, so its residuals are zero and it changes nothing: a useless test
oracle. These nets draw every weight at random, the zero convolutions small enough that the
residuals move the image without swamping it.
"""

from __future__ import annotations

from pathlib import Path

import torch

from sdserve.pipeline.controlnet import CONTROLNET_DIR

TINY_CONTROLNETS = ("edges", "depth")
"""The nets a tiny controlnet model carries (`add_controlnets`)."""

ZERO_CONV_STD = 0.2
"""The spread of the nets' output convolutions' weights."""


def random_controlnet(unet, seed: int, conditioning_channels: tuple[int, ...] | None = None):
    """A ControlNet for `unet` (its config's encoder half and text/added conditioning), every
    weight seeded at random; `conditioning_channels`: the control image encoder's widths (one
    stride-2 step between each; default: as many as the VAE's downsampling needs for a tiny
    model, three steps of 8x)."""
    from diffusers import ControlNetModel

    torch.manual_seed(seed)
    kwargs = {}
    if conditioning_channels is not None:
        kwargs["conditioning_embedding_out_channels"] = conditioning_channels
    net = ControlNetModel.from_unet(unet, load_weights_from_unet=False, **kwargs)
    zero_convs = [*net.controlnet_down_blocks, net.controlnet_mid_block,
                  net.controlnet_cond_embedding.conv_out]  # fmt: skip
    for conv in zero_convs:
        torch.nn.init.normal_(conv.weight, std=ZERO_CONV_STD)
        torch.nn.init.zeros_(conv.bias)
    return net.eval().requires_grad_(False)


def add_controlnets(model_dir: str | Path, unet, seed: int = 0,
                    names: tuple[str, ...] = TINY_CONTROLNETS) -> dict[str, Path]:  # fmt: skip
    """Writes one random ControlNet per name into `model_dir/controlnets/` (seeds seed+10,
    seed+11, ...); returns {name: folder}."""
    out = {}
    for i, name in enumerate(names):
        folder = Path(model_dir) / CONTROLNET_DIR / name
        random_controlnet(unet, seed + 10 + i).save_pretrained(folder)
        out[name] = folder
    return out
