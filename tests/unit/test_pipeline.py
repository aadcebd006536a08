"""The pipeline stages in-process (no Ray): peer equivalence with diffusers, batch invariance.

Every stage runs in float32 here, as diffusers' pipeline does at its defaults; bfloat16 against
diffusers in bfloat16 is tests/unit/test_precision.py."""

import numpy as np
import pytest
import torch
from helpers import diffusers_image, solo_latents

from sdserve.constants import UNET_SCHEDULER_NAMES
from sdserve.pipeline.denoise import Denoiser
from sdserve.pipeline.text import TextEncoder
from sdserve.pipeline.vae import VaeDecoder


@pytest.fixture(scope="module")
def stages(tiny_model):
    f32 = "float32"  # as diffusers' pipeline at its defaults
    return (TextEncoder(tiny_model, dtype=f32), Denoiser(tiny_model, dtype=f32),
            VaeDecoder(tiny_model, dtype=f32))  # fmt: skip


def _generate(stages, **kwargs):
    text, denoiser, vae = stages
    return vae.decode(solo_latents(text, denoiser, **kwargs))


@pytest.mark.parametrize("scheduler", UNET_SCHEDULER_NAMES)
@pytest.mark.parametrize("guidance", [7.5, 1.0])
def test_matches_diffusers(stages, tiny_model, diffusers_pipe, scheduler, guidance):
    kwargs = dict(
        prompt="a red circle",
        negative_prompt="blurry",
        steps=12,
        guidance=guidance,
        width=64,
        height=48,
    )
    ours = _generate(stages, seeds=[7], scheduler=scheduler, **kwargs)[0]
    theirs = diffusers_image(diffusers_pipe, tiny_model, scheduler, seed=7, **kwargs)
    assert ours.shape == theirs.shape == (48, 64, 3)
    assert np.abs(ours.astype(int) - theirs.astype(int)).max() <= 2


def test_images_of_one_request_equal_single_requests(stages):
    """Image i of a K-image request (one batched U-Net forward) is the image of seed + i alone."""
    kwargs = dict(
        prompt="a blue square",
        steps=8,
        guidance=5.0,
        width=64,
        height=64,
        scheduler="euler_ancestral",
    )
    batch = _generate(stages, seeds=[100, 101, 102], **kwargs)
    for i, seed in enumerate([100, 101, 102]):
        alone = _generate(stages, seeds=[seed], **kwargs)[0]
        assert np.abs(batch[i].astype(int) - alone.astype(int)).max() <= 2
    assert np.abs(batch[0].astype(int) - batch[1].astype(int)).max() > 2


def test_prompt_guidance_and_seed_change_the_image(stages):
    base = dict(
        prompt="a red circle",
        steps=6,
        guidance=7.5,
        width=64,
        height=64,
        seeds=[1],
        scheduler="ddim",
    )
    image = _generate(stages, **base)[0].astype(int)
    for change in ({"prompt": "a green triangle"}, {"guidance": 1.0}, {"seeds": [2]}):
        other = _generate(stages, **{**base, **change})[0].astype(int)
        assert np.abs(image - other).max() > 0, change


def test_latent_shape_follows_vae_scale(stages):
    _, denoiser, _ = stages
    assert denoiser.vae_scale_factor == 8
    assert denoiser.native_size == (64, 64)
    cond = torch.zeros(1, 77, 32)
    latents = denoiser.denoise(
        cond, None, width=96, height=32, steps=2, guidance_scale=1.0, scheduler="ddim", seeds=[0]
    )
    assert latents.shape == (1, 4, 4, 12)
