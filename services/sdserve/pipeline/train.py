"""Training a small text-to-image model on the synthetic shapes (issue 6; work in progress).

Two phases, each seeded, on the CPU:
1. the VAE (AutoencoderKL) learns to reconstruct the renders (L1 + a small KL term);
2. the CLIP text encoder and the U-Net learn together to predict the noise that DDPM's forward
   process added to the (frozen) VAE's latents, conditioned on the prompt; 10% of prompts are
   replaced by "" so that classifier-free guidance works.

The result is a diffusers folder that `StableDiffusionPipeline.from_pretrained` loads, with
fp16 safetensors weights. `make_tiny_model`'s architecture and tokenizer are the starting point.
"""

from __future__ import annotations

import json
import logging
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from sdserve.pipeline.synthetic import dataset
from sdserve.pipeline.tiny import SD15_SCHEDULER

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainConfig:
    seed: int = 0
    size: int = 64
    samples: int = 4096
    """Distinct (caption, image) pairs drawn from the synthetic grammar."""
    vae_steps: int = 1500
    unet_steps: int = 6000
    batch_size: int = 32
    vae_lr: float = 1e-3
    unet_lr: float = 3e-4
    uncond_p: float = 0.1
    """Share of prompts replaced by "" (classifier-free guidance)."""


Progress = Callable[[str, int, int, float], None]
"""progress(phase, step, total, loss)."""


def _images(pairs, size: int) -> torch.Tensor:
    import numpy as np

    array = np.stack([np.asarray(image, dtype=np.float32) for _, image in pairs])
    return torch.from_numpy(array).permute(0, 3, 1, 2) / 127.5 - 1.0  # (n, 3, size, size)


def train(model_dir: str | Path, config: TrainConfig, progress: Progress | None = None) -> None:
    """Trains the model in `model_dir` (a folder `make_tiny_model` wrote) in place and saves it
    with fp16 weights."""
    from diffusers import DDPMScheduler, StableDiffusionPipeline

    model_dir = Path(model_dir)
    torch.manual_seed(config.seed)
    rng = random.Random(config.seed)
    pipe = StableDiffusionPipeline.from_pretrained(model_dir, local_files_only=True)
    pairs = dataset(config.samples, seed=config.seed, size=config.size)
    images = _images(pairs, config.size)
    prompts = [caption.prompt for caption, _ in pairs]
    vae, unet, text_encoder, tokenizer = pipe.vae, pipe.unet, pipe.text_encoder, pipe.tokenizer

    # 1. The VAE.
    vae.train()
    opt = torch.optim.AdamW(vae.parameters(), lr=config.vae_lr)
    for step in range(1, config.vae_steps + 1):
        batch = images[torch.randint(0, len(images), (config.batch_size,))]
        posterior = vae.encode(batch).latent_dist
        recon = vae.decode(posterior.sample()).sample
        loss = (recon - batch).abs().mean() + 1e-6 * posterior.kl().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        if progress:
            progress("vae", step, config.vae_steps, float(loss))
    vae.eval().requires_grad_(False)
    with torch.no_grad():
        latents = torch.cat([
            vae.encode(images[i : i + 256]).latent_dist.mode() for i in range(0, len(images), 256)
        ]) * vae.config.scaling_factor  # fmt: skip

    # 2. The text encoder and the U-Net, on DDPM's noise-prediction loss.
    noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    text_encoder.train()
    unet.train()
    params = list(unet.parameters()) + list(text_encoder.parameters())
    opt = torch.optim.AdamW(params, lr=config.unet_lr)
    for step in range(1, config.unet_steps + 1):
        idx = torch.randint(0, len(images), (config.batch_size,))
        texts = ["" if rng.random() < config.uncond_p else prompts[i] for i in idx.tolist()]
        ids = tokenizer(texts, padding="max_length", max_length=tokenizer.model_max_length,
                        truncation=True, return_tensors="pt").input_ids  # fmt: skip
        cond = text_encoder(ids)[0]
        x0 = latents[idx]
        noise = torch.randn_like(x0)
        t = torch.randint(0, noise_scheduler.config.num_train_timesteps, (len(idx),))
        noisy = noise_scheduler.add_noise(x0, noise, t)
        loss = (unet(noisy, t, cond).sample - noise).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        if progress:
            progress("unet", step, config.unet_steps, float(loss))

    text_encoder.eval()
    unet.eval()
    pipe.to(torch.float16)
    pipe.save_pretrained(model_dir, safe_serialization=True)
    # save_pretrained rewrites the scheduler's config; keep SD 1.5's verbatim, as
    # make_tiny_model does (it carries keys PNDM ignores but DDIM reads).
    (model_dir / "scheduler" / "scheduler_config.json").write_text(
        json.dumps(SD15_SCHEDULER, indent=2) + "\n"
    )
