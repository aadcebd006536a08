"""The default model's recipe: its training settings and how it is evaluated.

Free of torch, so that the CLI can show these defaults in `--help` without importing it.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class TrainConfig:
    seed: int = 0
    size: int = 64
    samples: int = 16384
    """Distinct (caption, image) pairs drawn from the synthetic grammar."""
    vae_steps: int = 1000
    vae_batch_size: int = 16
    vae_lr: float = 1e-3
    unet_steps: int = 4500
    batch_size: int = 32
    unet_lr: float = 1e-3
    warmup_steps: int = 200
    uncond_p: float = 0.1
    """Share of prompts replaced by "" (classifier-free guidance)."""
    snr_gamma: float = 5.0
    ema_decay: float = 0.999


EVAL_SEED = 20_261_129
"""Seeds the evaluation prompts and noise; training uses small seeds (0 by default)."""

DEFAULT_GUIDANCE = 7.5
"""The guidance scale the model card states (and sdserve's serving default)."""

DEFAULT_RUNS = (("ddpm", 1000), ("ddim", 10), ("ddim", 20), ("ddim", 25), ("ddim", 50),
                ("ddim", 100), ("dpmpp_2m", 20))  # fmt: skip
"""The issue's table: DDPM at its 1000 training steps against DDIM's 10-100, and DPM-Solver++."""
