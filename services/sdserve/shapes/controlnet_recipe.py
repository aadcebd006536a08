"""The recipe of the default model's own ControlNet, `shape` (issue 28): `sdserve
train-controlnet`'s settings and how the net is evaluated.

Free of torch, so that the CLI can show these defaults in `--help` without importing it.
"""

from __future__ import annotations

from dataclasses import dataclass

from sdserve.shapes.recipe import EVAL_SEED


@dataclass(frozen=True)
class ControlNetTrainConfig:
    seed: int = 0
    """Seeds the training pairs (`controlnet_data.pairs`) and torch's noise."""
    steps: int = 1500
    lr: float = 1e-3
    batch_size: int = 32
    warmup_steps: int = 20
    samples: int = 8192
    """Distinct (caption, image, silhouette) triples."""
    conditioning_channels: tuple[int, ...] = (16, 32, 64)
    """Widths of the control image's encoder, one stride-2 step between each: 64x64 pixels to
    the 16x16 latents (the default model's VAE downsamples 4x, not SD's 8x)."""
    uncond_p: float = 0.1
    """Share of prompts replaced by "" (classifier-free guidance), as the base model's."""
    snr_gamma: float = 5.0
    """Min-SNR-gamma loss weighting, as the base model's."""
    size: int = 64


CONTROLNET_NAME = "shape"
"""The folder name of the net in the default model's `controlnets/`."""
CONTROLNET_EVAL_SEED = EVAL_SEED + 20_000
"""Seeds the evaluation's captions and silhouettes (one generator), and image i's noise is
`CONTROLNET_EVAL_SEED + i`. Training draws its pairs from `random.Random(seed)` and its noise
from torch's generator seeded with `seed`, small numbers (0 by default)."""
CONTROLNET_EVAL_PROMPTS = 64
CONTROLNET_EVAL_RUN = ("ddim", 25)
"""The sampler and steps of the evaluation (the model card's)."""
IOU_THRESHOLD = 0.7
"""An image follows its silhouette when its foreground's IoU with it is at least this."""
