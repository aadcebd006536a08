"""The diffusion transformers' maths: SD3 and FLUX images in the shared step batch.

Both are flow-matching models: `FlowMatchEulerDiscreteScheduler` walks sigmas from 1 to 0,
x_next = x + (sigma_next - sigma) * v, where the transformer predicts v. Each image keeps its
own scheduler instance (its own sigmas: steps and shift are per row) and its own generator, as
U-Net images do (`sample.Sample`), so one forward covers rows at different steps.

It mirrors `StableDiffusion3Pipeline.__call__` and `FluxPipeline.__call__` (diffusers 0.42):

- SD3: the prompt tokens are CLIP-L and CLIP-G side by side, padded to T5's width, then T5's
  tokens (`prompt_tokens`); the pooled embedding is both CLIPs' projections. The transformer
  takes t (0..1000) per row; classifier-free guidance as SD's. The sigmas come from the
  scheduler config's `shift` (3.0 for SD 3.5).
- FLUX: latents are packed in 2x2 patches, (1, h/2 * w/2, 4C), with image position ids (row,
  column) and zero text ids; the prompt tokens are T5's alone, the pooled embedding CLIP-L's.
  The sigmas are linspace(1, 1/steps) shifted by mu, which grows with the image's sequence
  length (`calculate_shift`). A guidance-distilled model (`guidance_embeds`) takes the
  guidance scale per row as an embedding; true classifier-free guidance (`true_cfg_scale` > 1)
  adds the negative prompt's row, as FluxPipeline's second forward does.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from diffusers.utils.torch_utils import randn_tensor

from sdserve.pipeline.sample import DitConditioning, Sample, guidance_until


def calculate_shift(image_seq_len: int, config: dict) -> float:
    """FLUX's mu: linear in the image's sequence length, between the config's base_shift at
    base_image_seq_len and max_shift at max_image_seq_len (diffusers' `calculate_shift`)."""
    base_len, max_len = config.get("base_image_seq_len", 256), config.get("max_image_seq_len", 4096)
    base, top = config.get("base_shift", 0.5), config.get("max_shift", 1.15)
    m = (top - base) / (max_len - base_len)
    return image_seq_len * m + base - m * base_len


def prompt_tokens(family: str, clip: torch.Tensor | None, t5: torch.Tensor) -> torch.Tensor:
    """The transformer's `encoder_hidden_states` for one prompt: SD3: the CLIP tokens
    (1, 77, hl + hg) zero-padded to T5's width, then T5's (1, L, d) -> (1, 77 + L, d); FLUX:
    T5's (1, L, d)."""
    if family == "flux":
        return t5
    clip = torch.nn.functional.pad(clip, (0, t5.shape[-1] - clip.shape[-1]))
    return torch.cat([clip.to(t5.dtype), t5], dim=-2)


def pack(latents: torch.Tensor) -> torch.Tensor:
    """FLUX's 2x2 patches: (B, C, h, w) -> (B, h/2 * w/2, 4C) (`FluxPipeline._pack_latents`)."""
    b, c, h, w = latents.shape
    latents = latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return latents.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack(latents: torch.Tensor, latent_size: tuple[int, int]) -> torch.Tensor:
    """The inverse of `pack`: (B, h/2 * w/2, 4C) -> (B, C, h, w)."""
    b, _, channels = latents.shape
    h, w = latent_size
    latents = latents.view(b, h // 2, w // 2, channels // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return latents.reshape(b, channels // 4, h, w)


def image_ids(latent_size: tuple[int, int], device, dtype) -> torch.Tensor:
    """FLUX's image position ids, (h/2 * w/2, 3): (0, row, column) of each packed patch."""
    h, w = latent_size[0] // 2, latent_size[1] // 2
    ids = torch.zeros(h, w, 3)
    ids[..., 1] = ids[..., 1] + torch.arange(h)[:, None]
    ids[..., 2] = ids[..., 2] + torch.arange(w)[None, :]
    return ids.reshape(h * w, 3).to(device=device, dtype=dtype)


def make_scheduler(
    family: str,
    config: dict,
    steps: int,
    latent_size: tuple[int, int],
    shift: float,
    patch_size: int,
    device,
) -> FlowMatchEulerDiscreteScheduler:
    """An image's own scheduler, its timesteps set as the family's pipeline sets them; `shift`
    > 0 overrides the model's (SD3: the config's `shift`; FLUX: mu = ln(shift))."""
    if family == "sd3" and shift > 0:
        config = {**config, "shift": shift}
    scheduler = FlowMatchEulerDiscreteScheduler.from_config(config)
    h, w = latent_size
    kwargs: dict = {}
    if family == "flux":
        sigmas = np.linspace(1.0, 1 / steps, steps)
        if scheduler.config.get("use_flow_sigmas", False):
            sigmas = None
        mu = math.log(shift) if shift > 0 else calculate_shift((h // 2) * (w // 2), config)
        scheduler.set_timesteps(sigmas=sigmas, device=device, mu=mu)
        scheduler.set_begin_index(0)
        return scheduler
    if scheduler.config.get("use_dynamic_shifting", False):  # SD3 with FLUX-style shifting
        seq_len = (h // patch_size) * (w // patch_size)
        kwargs["mu"] = math.log(shift) if shift > 0 else calculate_shift(seq_len, config)
    scheduler.set_timesteps(steps, device=device, **kwargs)
    return scheduler


def make_dit_sample(*, family: str, cond: torch.Tensor, uncond: torch.Tensor | None,
                    cfg_scale: float, conditioning: DitConditioning, scheduler_config: dict,
                    steps: int, seed: int, shift: float, latent_channels: int, patch_size: int,
                    device: torch.device, dtype: torch.dtype,
                    guidance_stop: float = 1.0) -> Sample:  # fmt: skip
    """Prepares one image as the family's pipeline does: initial noise from its own CPU
    generator, in the model's dtype (then held in float32; FLUX's packed), and its
    timesteps. `uncond` is dropped when cfg_scale <= 1."""
    h, w = conditioning.latent_size
    scheduler = make_scheduler(family, scheduler_config, steps, (h, w), shift, patch_size,
                               device)  # fmt: skip
    generator = torch.Generator("cpu").manual_seed(seed % 2**64)
    latents = randn_tensor((1, latent_channels, h, w), generator=generator, device=device,
                           dtype=dtype).float()  # fmt: skip
    if family == "flux":
        latents = pack(latents)
    timesteps = scheduler.timesteps
    return Sample(
        cond=cond,
        uncond=uncond if cfg_scale > 1 else None,
        guidance_scale=cfg_scale,
        scheduler=scheduler,
        generator=generator,
        latents=latents,
        timesteps=timesteps,
        guidance_until=guidance_until(timesteps, guidance_stop),
        dit=conditioning,
    )


@torch.inference_mode()
def transformer_step(transformer: torch.nn.Module, family: str,
                     samples: Sequence[Sample]) -> None:  # fmt: skip
    """Advances every sample by one step with ONE transformer forward over the rows
    [uncond rows of the samples guided now..., cond rows of all...], each row at its own
    timestep (and FLUX guidance). All samples must share the latent size and the prompt
    tokens' length (the engine's bucket). Latents, guidance and the scheduler's step stay in
    float32; the forward runs in the transformer's dtype."""
    dtype = transformer.dtype
    guided = [s for s in samples if s.guided_now]
    rows = guided + list(samples)
    t = [s.timesteps[s.index] for s in rows]
    x = torch.cat([s.latents for s in rows]).to(dtype)
    context = torch.cat([s.uncond for s in guided] + [s.cond for s in samples])
    pooled = torch.cat([s.dit.uncond_pooled for s in guided] + [s.dit.pooled for s in samples])
    if family == "flux":
        t_rows = torch.stack([ti.to(dtype) for ti in t]).to(x.device) / 1000
        guidance = None
        if transformer.config.guidance_embeds:
            guidance = torch.tensor([s.dit.guidance for s in rows], dtype=torch.float32,
                                    device=x.device)  # fmt: skip
        out = transformer(
            hidden_states=x, timestep=t_rows, guidance=guidance, pooled_projections=pooled,
            encoder_hidden_states=context, img_ids=image_ids(rows[0].dit.latent_size, x.device,
                                                             dtype),
            txt_ids=torch.zeros(context.shape[1], 3, device=x.device, dtype=dtype),
            return_dict=False,
        )[0]  # fmt: skip
    else:
        t_rows = torch.stack(t).to(x.device)
        out = transformer(hidden_states=x, timestep=t_rows, encoder_hidden_states=context,
                          pooled_projections=pooled, return_dict=False)[0]  # fmt: skip
    out = out.float()
    uncond_row = {id(s): i for i, s in enumerate(guided)}
    for j, sample in enumerate(samples):
        v = out[len(guided) + j : len(guided) + j + 1]
        i = uncond_row.get(id(sample))
        if i is not None:  # classifier-free guidance (SD3; FLUX's true CFG)
            v = out[i : i + 1] + sample.guidance_scale * (v - out[i : i + 1])
        t_now = sample.timesteps[sample.index]
        sample.latents = sample.scheduler.step(v, t_now, sample.latents, return_dict=False)[0]
        sample.index += 1
