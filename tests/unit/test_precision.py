"""Precision (`dtype`): bfloat16 stages against diffusers run in bfloat16 on the same weights,
latents kept in float32, and what `auto` picks (sdserve/pipeline/precision.py)."""

import asyncio

import numpy as np
import pytest
import torch
from helpers import EAGER, diffusers_image

from sdserve.pipeline import precision
from sdserve.pipeline.denoise import Denoiser
from sdserve.pipeline.text import TextEncoder
from sdserve.pipeline.vae import VaeDecoder

BF16 = "bfloat16"


@pytest.fixture(scope="module")
def bf16_stages(tiny_model):
    return (TextEncoder(tiny_model, dtype=BF16), Denoiser(tiny_model, dtype=BF16),
            VaeDecoder(tiny_model, dtype=BF16))  # fmt: skip


@pytest.fixture(scope="module")
def bf16_pipe(tiny_model):
    """diffusers' pipeline loaded as a user loads it for bf16: torch_dtype=torch.bfloat16."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(tiny_model, torch_dtype=torch.bfloat16,
                                                   local_files_only=True)  # fmt: skip
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _ours(stages, *, prompt, negative_prompt, steps, guidance, width, height, seed, scheduler):
    text, denoiser, vae = stages
    emb = text.encode(prompt, negative_prompt, with_uncond=guidance > 1)
    latents = denoiser.denoise(emb.cond, emb.uncond, width=width, height=height, steps=steps,
                               guidance_scale=guidance, scheduler=scheduler,
                               seeds=[seed])  # fmt: skip
    return vae.decode(latents)[0]


@pytest.mark.parametrize("scheduler", ["ddim", "dpmpp_2m", "euler_ancestral"])
@pytest.mark.parametrize("guidance", [7.5, 1.0])
def test_bf16_matches_diffusers_in_bf16(
    bf16_stages, bf16_pipe, diffusers_pipe, tiny_model, scheduler, guidance
):
    """Every stage in bfloat16 against diffusers' pipeline in bfloat16 (and both against
    diffusers in float32). sdserve keeps the latents and the scheduler's arithmetic in float32
    between steps where diffusers keeps them in bfloat16, so single pixels differ by a few
    levels (measured up to 6/255 here, mean under 1) while sdserve's image is as close to the
    float32 one as diffusers' bfloat16 image is (docs/precision-and-compilation.md)."""
    kwargs = dict(prompt="a red circle", negative_prompt="blurry", steps=12, guidance=guidance,
                  width=64, height=48, seed=7)  # fmt: skip
    ours = _ours(bf16_stages, scheduler=scheduler, **kwargs).astype(int)
    theirs = diffusers_image(bf16_pipe, tiny_model, scheduler, **kwargs).astype(int)
    exact = diffusers_image(diffusers_pipe, tiny_model, scheduler, **kwargs).astype(int)
    assert ours.shape == theirs.shape == (48, 64, 3)
    assert np.abs(ours - theirs).mean() <= 1.5 and np.abs(ours - theirs).max() <= 12
    assert np.abs(ours - exact).mean() <= np.abs(theirs - exact).mean() + 0.15
    assert np.abs(ours - exact).max() > 0  # bfloat16 really ran


def test_latents_stay_float32_around_a_bf16_unet(bf16_stages):
    """The U-Net computes in bfloat16; the latents between steps, the noise scaled by the
    scheduler and the final latents are float32."""
    text, denoiser, _ = bf16_stages
    assert denoiser.unet.dtype == torch.bfloat16
    emb = text.encode("a red circle", "", with_uncond=True)
    job = denoiser.make_job("r", emb.cond, emb.uncond, width=64, height=64, steps=3,
                            guidance_scale=7.5, scheduler="euler", seeds=[1])  # fmt: skip
    assert job.samples[0].latents.dtype == torch.float32
    latents = denoiser.denoise(emb.cond, emb.uncond, width=64, height=64, steps=3,
                               guidance_scale=7.5, scheduler="euler", seeds=[1])  # fmt: skip
    assert latents.dtype == torch.float32 and torch.isfinite(latents).all()


def test_auto_on_this_machine_and_the_stages_say_so(tiny_model):
    """auto resolves per device, and ListModels reports each stage's dtype and compile mode
    (here through the in-process request path)."""
    from sdserve.api.proto import served_model_to_pb
    from sdserve.config import ModelConfig, SdserveConfig
    from sdserve.orchestration.in_process import InProcessStageClient
    from sdserve.orchestration.path import StagePath

    expected = precision.dtype_name(precision.auto_dtype(torch.device("cpu")))
    assert expected == ("bfloat16" if precision.cpu_has_bf16_matmul() else "float32")
    config = SdserveConfig(model=ModelConfig(path=str(tiny_model)), **EAGER)
    client = InProcessStageClient.from_config(config)
    try:
        (model,) = asyncio.run(StagePath(client, config).models())
    finally:
        client.close()
    stages = [(s.stage, s.device, s.dtype, s.compile) for s in model.stages]
    assert stages == [
        (name, "cpu", expected, "off")
        for name in ("text_encoder", "vae_encoder", "denoiser", "vae_decoder")
    ]
    pb = served_model_to_pb(model)
    assert [s.dtype for s in pb.stages] == [expected] * 4


def test_batch_invariant_runs_each_image_alone_in_its_forward(bf16_stages):
    """`engine.batch_invariant`: an image's rows get a forward of their own, so its pixels are
    those of the image alone to the level (0/255) whatever it is batched with."""
    from sdserve.pipeline.engine import DenoiseEngine, Finished

    text, denoiser, vae = bf16_stages

    def run(prompts: list[str], invariant: bool) -> tuple[object, list]:
        done, stats = {}, []
        engine = DenoiseEngine(denoiser.unet, batch_invariant=invariant, on_stats=stats.append)
        for i, prompt in enumerate(prompts):
            emb = text.encode(prompt, "", with_uncond=True)
            engine.submit(denoiser.make_job(
                f"r{i}", emb.cond, emb.uncond, width=64, height=64, steps=5,
                guidance_scale=[7.5, 3.0][i % 2], scheduler="euler_ancestral", seeds=[40 + i],
                on_event=lambda e, i=i: done.__setitem__(i, e.latents)
                if isinstance(e, Finished) else None,
            ))  # fmt: skip
        while engine.step() is not None or engine.counts() != (0, 0):
            pass
        return done[0], stats

    prompts = ["a red circle"] + [f"prompt {i}" for i in range(7)]
    alone, _ = run(prompts[:1], invariant=True)
    forwards = []
    hook = denoiser.unet.register_forward_pre_hook(lambda module, args: forwards.append(1))
    try:
        together, stats = run(prompts, invariant=True)
    finally:
        hook.remove()
    assert max(s.batch_size for s in stats) == 8  # one step held all eight images
    assert len(forwards) == sum(s.batch_size for s in stats)  # a forward per image per step
    assert np.abs(vae.decode(alone).astype(int) - vae.decode(together).astype(int)).max() == 0
