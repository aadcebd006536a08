"""One image being denoised (`Sample`) and how diffusers prepares it (`make_sample`).

A sample holds everything that makes its image its own in a shared step batch: its scheduler
instance, its seeded CPU generator, its latents (float32, whatever the U-Net's dtype), its
timesteps, guidance, image conditioning, DeepCache state, SDXL conditioning, LoRA adapters and
ControlNets, or a diffusion transformer's conditioning (`DitConditioning`, `pipeline.dit`).
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from diffusers.utils.torch_utils import randn_tensor

from sdserve.pipeline.images import (
    EncodedImage,
    ImageConditioning,
    start_latents,
    strength_timesteps,
)
from sdserve.pipeline.schedulers import make_scheduler
from sdserve.pipeline.text_time import TextTime

if TYPE_CHECKING:
    from sdserve.pipeline.controlnet import Control
    from sdserve.pipeline.lora_adapter import LoraAdapter


@dataclass(frozen=True)
class DitConditioning:
    """What a diffusion transformer's row takes besides its tokens (`pipeline.dit`).

    Attributes:
        pooled: the prompt's pooled embedding, shape (1, pooled_projection_dim).
        uncond_pooled: the negative prompt's, same shape; None without guidance.
        guidance: FLUX with `guidance_embeds`: the embedded guidance scale; None otherwise.
        latent_size: (h, w) of the unpacked latents (FLUX packs them in 2x2 patches).
    """

    pooled: torch.Tensor
    uncond_pooled: torch.Tensor | None
    guidance: float | None
    latent_size: tuple[int, int]


@dataclass(eq=False)
class Sample:
    """One image being denoised.

    Attributes:
        cond: prompt embeddings, shape (1, seq_len, hidden).
        uncond: negative-prompt embeddings of the same shape, or None without guidance.
        guidance_scale: CFG scale; used only when `uncond` is set.
        scheduler: this image's own scheduler instance, timesteps already set.
        generator: this image's own CPU generator (initial noise, ancestral samplers' noise).
        latents: shape (1, latent_channels, height // f, width // f), float32 whatever the
            U-Net's dtype.
        timesteps: the timesteps this image runs: all of its scheduler's, or for an image
            input the last `int(steps * strength)` of them.
        image: what an image-to-image or inpainting sample needs at every step.
        text_time: SDXL's pooled embeddings and size conditioning (None for SD 1.x/2.x).
        loras: its request's LoRA adapters, each with its scale (empty: none).
        controls: its request's ControlNet entries (empty: none).
    """

    cond: torch.Tensor
    uncond: torch.Tensor | None
    guidance_scale: float
    scheduler: object
    generator: torch.Generator
    latents: torch.Tensor
    timesteps: torch.Tensor
    step_kwargs: dict = field(default_factory=dict)
    index: int = 0
    image: ImageConditioning | None = None
    guidance_until: int | None = None
    """The last step index that runs guidance (None: every step)."""
    cache_interval: int = 1
    """DeepCache: the whole U-Net every this many steps, the shallow branch in between."""
    cache_levels: int = 0
    """DeepCache: the shallow branch's depth (`deepcache.shallow_forward`)."""
    deep_cache: torch.Tensor | None = None
    """DeepCache: the deep features of the last full step, (uncond, cond) rows or (cond,)."""
    text_time: TextTime | None = None
    loras: tuple[tuple[LoraAdapter, float], ...] = ()
    controls: tuple[Control, ...] = ()
    dit: DitConditioning | None = None
    """A diffusion transformer's image (None: a U-Net's)."""

    @property
    def guided_now(self) -> bool:
        """Whether this step computes the unconditional row (guidance on and not stopped)."""
        return self.uncond is not None and (
            self.guidance_until is None or self.index <= self.guidance_until
        )

    @property
    def controlled_now(self) -> bool:
        """Whether a ControlNet conditions this step (one of its controls' windows is open)."""
        return any(c.active(self.index, len(self.timesteps)) for c in self.controls)

    @property
    def shallow(self) -> bool:
        """Whether this step runs only the U-Net's shallow branch on cached deep features."""
        return self.cache_interval > 1 and self.index % self.cache_interval != 0

    @property
    def done(self) -> bool:
        return self.index >= len(self.timesteps)


def guidance_until(timesteps: torch.Tensor, guidance_stop: float) -> int | None:
    """The last step index that runs guidance: int(len(timesteps) * guidance_stop), as
    diffusers' documented dynamic-CFG callback stops it; None (every step) at 1."""
    return int(len(timesteps) * guidance_stop) if guidance_stop < 1 else None


def make_sample(
    *,
    cond: torch.Tensor,
    uncond: torch.Tensor | None,
    guidance_scale: float,
    scheduler_name: str,
    scheduler_config: dict,
    steps: int,
    seed: int,
    latent_shape: tuple[int, int, int],
    device: torch.device,
    dtype: torch.dtype,
    init: EncodedImage | None = None,
    strength: float = 1.0,
    inpainting_unet: bool = False,
    guidance_stop: float = 1.0,
    cache_interval: int = 1,
    cache_levels: int = 0,
    text_time: TextTime | None = None,
    loras: Sequence[tuple[LoraAdapter, float]] = (),
    controls: Sequence[Control] = (),
) -> Sample:
    """Prepares one image as diffusers does: timesteps (phase 4), latents (phase 5), step kwargs
    (phase 6). `uncond` is dropped when guidance_scale <= 1: that half is never computed.

    With `init`, the image starts from that image as the image-to-image pipeline (no mask) or
    the inpainting pipeline (a mask) does: `strength` cuts the timesteps to the last
    `int(steps * strength)` and picks the noise level of the first latents.

    `guidance_stop` < 1 ends guidance after step int(len(timesteps) * guidance_stop), as
    diffusers' documented dynamic-CFG callback does; `cache_interval` > 1 turns DeepCache on."""
    scheduler = make_scheduler(scheduler_name, scheduler_config)
    scheduler.set_timesteps(steps, device=device)
    timesteps = scheduler.timesteps
    generator = torch.Generator("cpu").manual_seed(seed % 2**64)
    image = None
    # The noise is drawn in the U-Net's dtype, as diffusers draws it, then held in float32.
    if init is None:
        latents = randn_tensor((1, *latent_shape), generator=generator, device=device, dtype=dtype)
        latents = latents.float() * scheduler.init_noise_sigma
    else:
        timesteps = strength_timesteps(scheduler, steps, strength)
        latents, image = start_latents(
            init, scheduler=scheduler, timesteps=timesteps, strength=strength,
            generator=generator, inpainting_unet=inpainting_unet, device=device, dtype=dtype,
        )  # fmt: skip
        latents = latents.float()
    accepted = set(inspect.signature(scheduler.step).parameters)
    step_kwargs: dict = {}
    if "eta" in accepted:
        step_kwargs["eta"] = 0.0
    if "generator" in accepted:
        step_kwargs["generator"] = generator
    return Sample(
        cond=cond,
        uncond=uncond if guidance_scale > 1 else None,
        guidance_scale=guidance_scale,
        scheduler=scheduler,
        generator=generator,
        latents=latents,
        timesteps=timesteps,
        step_kwargs=step_kwargs,
        image=image,
        guidance_until=guidance_until(timesteps, guidance_stop),
        cache_interval=cache_interval,
        cache_levels=cache_levels,
        text_time=text_time,
        loras=tuple((adapter, float(scale)) for adapter, scale in loras),
        controls=tuple(controls),
    )
