"""The recipe of the default model's adapters (issue 17): `sdserve train-lora`'s settings and how
an adapter is evaluated.

Free of torch, so that the CLI can show these defaults in `--help` without importing it.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from sdserve.shapes.recipe import EVAL_SEED
from sdserve.shapes.synthetic import Caption, captions_with


@dataclass(frozen=True)
class LoraTrainConfig:
    color: str = "cyan"
    """The color the adapter teaches (a key of `synthetic.EXTRA_COLORS`)."""
    seed: int = 0
    steps: int = 2400
    rank: int = 16
    """LoRA rank; alpha = rank (scale 1)."""
    lr: float = 3e-3
    batch_size: int = 32
    warmup_steps: int = 40
    samples: int = 2048
    """Distinct (caption, image) pairs."""
    new_color_share: float = 0.5
    """Share of the pairs whose caption has the new color; the rest are ordinary captions of the
    8 colors, so that those stay put."""
    fg_share: float = 0.6
    """Of those, the share with the new color as the shape's color (the rest: the background)."""
    text_encoder: bool = True
    """Also adapt the text encoder's attention (q, k, v, out projections)."""
    convs: bool = True
    """Also adapt the U-Net's convolutions at the latents' full resolution (`UNET_CONVS`)."""
    ema_decay: float = 0.995
    """The adapter saved is an exponential moving average of the trained weights (as the base
    model's is, over fewer steps); 0: the last weights."""
    uncond_p: float = 0.1
    """Share of prompts replaced by "" (classifier-free guidance), as the base model's."""
    snr_gamma: float = 5.0
    """Min-SNR-gamma loss weighting, as the base model's."""
    invert_steps: int = 15
    """Steps of gradient descent through the frozen VAE decoder that find the latents of an
    image with the new color (the VAE's encoder snaps it to a color it knows)."""
    size: int = 64
    held_out: int = 32
    """The first `held_out` of `held_out_captions(color)`, the prompts the adapter is evaluated
    on, never appear in its training data."""


UNET_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
"""The U-Net's attention projections (self- and cross-attention) that the adapter adapts."""
UNET_CONVS = (
    "up_blocks.2.resnets.0.conv1",
    "up_blocks.2.resnets.0.conv2",
    "up_blocks.2.resnets.1.conv1",
    "up_blocks.2.resnets.1.conv2",
    "conv_out",
)
"""With `convs`: the 3x3 convolutions of the U-Net's last up block and its output convolution
(LoCon factors). The default model has no attention at its 16x16 latents (only at 8x8 and 4x4),
and the VAE decodes cyan only from a narrow band of latents between blue's and green's: with
attention layers alone, cyan areas came out as blotches of blue and green."""


def unet_targets(config: LoraTrainConfig) -> tuple[str, ...]:
    return UNET_TARGETS + (UNET_CONVS if config.convs else ())


TEXT_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")
"""The text encoder's attention projections (with `text_encoder`)."""

LORA_EVAL_PROMPTS = 32
"""Prompts per group in `eval-default-model --lora` (held-out prompts with the new color, and
ordinary ones)."""


def held_out_captions(color: str, n: int = LORA_EVAL_PROMPTS) -> list[Caption]:
    """n distinct captions with `color`, alternately as the shape's color and as the background,
    drawn in a fixed order (seeded with `EVAL_SEED`): the first k are the same for every n >= k.
    `train-lora` leaves the first `LoraTrainConfig.held_out` out of its data and
    `eval-default-model --lora` evaluates on them."""
    rng = random.Random(EVAL_SEED)
    sides = [captions_with(color, as_background=bg) for bg in (False, True)]
    for side in sides:
        rng.shuffle(side)
    if n > sum(map(len, sides)):
        raise ValueError(f"the grammar has {sum(map(len, sides))} captions with {color}, not {n}")
    return [sides[i % 2][i // 2] for i in range(n)]


LORA_EVAL_RUN = ("ddim", 25)
"""The sampler and steps `eval-default-model --lora` uses by default (the model card's)."""
LORA_EVAL_BATCH = 32
"""Images per engine batch: rows with and without the adapter share every U-Net forward."""
