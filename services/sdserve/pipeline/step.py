"""One denoising step of a batch of samples: the U-Net forwards and each sample's update.

Rows that need the whole U-Net share one forward; rows on a DeepCache shallow step share one
shallow forward per branch depth. Each sample then gets its classifier-free guidance (when it
is still guided), its own scheduler's step, and for 4-channel inpainting the kept area blended
back. An SDXL U-Net also gets each row's pooled text embeddings and size conditioning
(`added_cond_kwargs`, from the sample's `TextTime`). Rows of samples with LoRA adapters get
them in the same forward (`lora.rows`: a guided sample's unconditional row too, as diffusers
applies adapters to both halves of the CFG batch); without any, the forward is unchanged.
Rows of samples with ControlNets get their residuals (`controlnet.residuals`: each net runs
once over the rows that use it); the other rows get zeros, which change nothing.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import torch

from sdserve.pipeline import controlnet, deepcache, lora
from sdserve.pipeline.images import blend_kept_area

if TYPE_CHECKING:
    from sdserve.pipeline.sample import Sample


def _added_cond_kwargs(guided: list[Sample], samples: list[Sample]) -> dict | None:
    """SDXL: the rows' `added_cond_kwargs` in the batch's row order (uncond rows of `guided`,
    then cond rows of `samples`): text_embeds (rows, projection_dim), time_ids (rows, 6)."""
    if samples[0].text_time is None:
        return None
    parts = [s.text_time for s in samples]
    uncond = [s.text_time for s in guided]
    return {
        "text_embeds": torch.cat([p.uncond_pooled for p in uncond] + [p.pooled for p in parts]),
        "time_ids": torch.cat([p.time_ids for p in uncond + parts]),
    }


FullForward = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, "dict | None"], torch.Tensor]
"""forward(x, timesteps, context, added_cond_kwargs) -> eps: the U-Net's plain forward (no
adapters, no DeepCache), e.g. compiled and padded to a bucket (`sdserve.pipeline.compiled`)."""


@torch.inference_mode()
def unet_step(unet: torch.nn.Module, samples: Sequence[Sample],
              forward: FullForward | None = None) -> None:  # fmt: skip
    """Advances every sample by one step.

    One U-Net forward covers the samples that need the whole U-Net, and one shallow forward
    (DeepCache) the samples on a cached step. Each forward's batch is [uncond rows of the
    samples guided at this step..., cond rows of all...], with one timestep per row, so samples
    at different steps share it. All samples must have the same latent shape.

    The forward's input is cast to the U-Net's dtype and its output back to float32: latents,
    guidance and the scheduler's arithmetic stay in float32 whatever the weights' dtype.
    `forward` runs the forwards that need neither LoRA adapters nor DeepCache (None: the
    U-Net itself, eagerly).
    """
    eps: dict[int, tuple[torch.Tensor | None, torch.Tensor]] = {}
    groups: dict[int | None, list[Sample]] = {}  # None: the full U-Net; else the branch depth
    for sample in samples:
        groups.setdefault(sample.cache_levels if sample.shallow else None, []).append(sample)
    for levels, group in groups.items():
        eps.update(_forward(unet, group, levels, forward))
    for sample in samples:
        u, eps_text = eps[id(sample)]
        noise_pred = eps_text
        if u is not None:
            noise_pred = u + sample.guidance_scale * (eps_text - u)  # classifier-free guidance
        t = sample.timesteps[sample.index]
        sample.latents = sample.scheduler.step(
            noise_pred, t, sample.latents, **sample.step_kwargs, return_dict=False
        )[0]
        if sample.image is not None and sample.image.image_latents is not None:
            k = sample.index + 1
            next_t = sample.timesteps[k] if k < len(sample.timesteps) else None
            sample.latents = blend_kept_area(sample.latents, sample.image, sample.scheduler, next_t)
        sample.index += 1


def _forward(unet, samples: list[Sample], shallow: int | None,
             forward: FullForward | None) -> dict:  # fmt: skip
    """One forward over the samples' rows: {id(sample): (eps of its uncond row or None, eps of
    its cond row)}. A full forward also refreshes the deep cache of the samples that use one."""
    guided = [s for s in samples if s.guided_now]
    t_of = {id(s): s.timesteps[s.index] for s in samples}
    scaled = {id(s): s.scheduler.scale_model_input(s.latents, t_of[id(s)]) for s in samples}
    rows = guided + list(samples)
    x = torch.cat([_unet_input(scaled[id(s)], s, unet.dtype) for s in rows])
    timesteps = torch.stack([t_of[id(s)].float() for s in rows]).to(x.device)
    context = torch.cat([s.uncond for s in guided] + [s.cond for s in samples])
    added = _added_cond_kwargs(guided, samples)
    plan = [s.loras for s in rows]  # each row's LoRA adapters
    levels = sorted({s.cache_levels for s in samples if s.cache_interval > 1})
    control = None if shallow is not None else controlnet.residuals(
        guided, samples, x, timesteps, context, added)  # fmt: skip
    plain = shallow is None and not levels and not any(plan) and control is None
    if plain and forward is not None:
        eps = forward(x, timesteps, context, added)  # the plain forward: compiled, padded
    else:
        down, mid = control or (None, None)
        with lora.rows(unet, plan) if any(plan) else contextlib.nullcontext():
            if shallow is not None:  # the branch depth of these rows
                deep = torch.cat([s.deep_cache[:1] for s in guided]
                                 + [s.deep_cache[-1:] for s in samples])  # fmt: skip
                eps = deepcache.shallow_forward(unet, x, timesteps, context, deep, shallow, added)
            else:
                with contextlib.ExitStack() as stack:
                    captured = {n: stack.enter_context(deepcache.capture(unet, n))
                                for n in levels}  # fmt: skip
                    eps = unet(x, timesteps, encoder_hidden_states=context,
                               added_cond_kwargs=added, down_block_additional_residuals=down,
                               mid_block_additional_residual=mid, return_dict=False)[0]  # fmt: skip
                for n in levels:
                    _keep_deep_features(guided, samples, captured[n][0], n)
    eps = eps.float()  # guidance and the scheduler's step run in float32
    uncond_row = {id(s): i for i, s in enumerate(guided)}
    out = {}
    for j, sample in enumerate(samples):
        i = uncond_row.get(id(sample))
        cond = len(guided) + j
        out[id(sample)] = (eps[i : i + 1] if i is not None else None, eps[cond : cond + 1])
    return out


def _keep_deep_features(guided: list[Sample], samples: list[Sample], deep: torch.Tensor,
                        levels: int) -> None:  # fmt: skip
    """Stores each caching sample's rows of the deep features captured for its branch depth:
    (uncond, cond) when it was guided, (cond,) when not."""
    uncond_row = {id(s): i for i, s in enumerate(guided)}
    for j, sample in enumerate(samples):
        if sample.cache_interval > 1 and sample.cache_levels == levels:
            i, cond = uncond_row.get(id(sample)), len(guided) + j
            parts = ([deep[i : i + 1]] if i is not None else []) + [deep[cond : cond + 1]]
            sample.deep_cache = torch.cat(parts)


def _unet_input(scaled: torch.Tensor, sample: Sample, dtype: torch.dtype) -> torch.Tensor:
    """A row of the U-Net's input in its dtype: the scaled latents, then a 9-channel inpainting
    model's mask and masked-image latents."""
    if sample.image is None or not sample.image.extra_channels:
        return scaled.to(dtype)
    return torch.cat([scaled.to(dtype), *(x.to(dtype) for x in sample.image.extra_channels)],
                     dim=1)  # fmt: skip
