"""ControlNet per row: equal to diffusers' ControlNet pipelines, and mixed in one step batch."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import diffusers_image
from PIL import Image, ImageDraw

from sdserve.pipeline.controlnet import Control, check_fits, load_controlnet, prepare_image
from sdserve.pipeline.denoise import Denoiser
from sdserve.pipeline.engine import DenoiseEngine
from sdserve.pipeline.text import TextEncoder
from sdserve.pipeline.vae import VaeDecoder
from sdserve.testing.tiny import make_tiny_model

F32 = torch.float32


def _control_image(kind: str, size: int = 64) -> Image.Image:
    """A white silhouette on black (what the `shape` ControlNet reads), or a gradient."""
    image = Image.new("RGB", (size, size))
    if kind == "disc":
        ImageDraw.Draw(image).ellipse([size // 5, size // 4, size * 3 // 4, size * 4 // 5],
                                      fill="white")  # fmt: skip
    else:
        ramp = np.linspace(0, 255, size, dtype=np.uint8)
        image = Image.fromarray(np.stack([np.tile(ramp, (size, 1))] * 3, axis=-1))
    return image


@pytest.fixture(scope="module")
def sd_model(tmp_path_factory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("models") / "tc", arch="tiny-controlnet")


@pytest.fixture(scope="module")
def sdxl_model(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("models") / "txc"
    return make_tiny_model(out, arch="tiny-sdxl-controlnet")


def _stages(model: Path):
    denoiser = Denoiser(model, dtype="float32")
    nets = {name: load_controlnet(model / "controlnets" / name, denoiser.device, F32)
            for name in ("edges", "depth")}  # fmt: skip
    return TextEncoder(model, dtype="float32"), denoiser, VaeDecoder(model, dtype="float32"), nets


@pytest.fixture(scope="module")
def sd(sd_model):
    return _stages(sd_model)


@pytest.fixture(scope="module")
def sdxl(sdxl_model):
    return _stages(sdxl_model)


def _max_diff(a: np.ndarray, b: np.ndarray) -> int:
    return int(np.abs(a.astype(int) - b.astype(int)).max())


def _controls(nets, entries, width=64, height=64) -> list[Control]:
    """Our controls for diffusers-style entries (name, image, scale, start, end, guess)."""
    return [Control(nets[name], prepare_image(image, width, height), scale, start, end, guess)
            for name, image, scale, start, end, guess in entries]  # fmt: skip


def _job(stages, request_id, entries, *, prompt="a red circle", guidance=7.5, steps=6,
         scheduler="ddim", seed=7, width=64, height=64, negative_prompt=""):  # fmt: skip
    text, denoiser, _, nets = stages
    emb = text.encode(prompt, negative_prompt, with_uncond=guidance > 1)
    return denoiser.make_job(
        request_id, emb.cond, emb.uncond, pooled=emb.pooled, uncond_pooled=emb.uncond_pooled,
        width=width, height=height, steps=steps, guidance_scale=guidance, scheduler=scheduler,
        seeds=[seed], controls=_controls(nets, entries, width, height),
    )  # fmt: skip


def _solo(stages, entries, **kwargs) -> np.ndarray:
    job = _job(stages, "solo", entries, **kwargs)
    denoiser = stages[1]
    from sdserve.pipeline.step import unet_step

    while not job.done:
        unet_step(denoiser.unet, job.samples)
    return stages[2].decode(torch.cat([s.latents for s in job.samples]))[0]


def _theirs(pipe_cls, model: Path, nets, entries, *, scheduler, guidance=7.5, steps=6,
            prompt="a red circle", seed=7, **kwargs) -> np.ndarray:  # fmt: skip
    """The diffusers ControlNet pipeline with the same folder, nets and inputs."""
    from diffusers.models.controlnets.multicontrolnet import MultiControlNetModel

    used = [nets[e[0]] for e in entries]
    pipe = pipe_cls.from_pretrained(
        model, controlnet=used[0] if len(used) == 1 else MultiControlNetModel(used),
        dtype=F32, local_files_only=True, **kwargs,
    )  # fmt: skip
    pipe.set_progress_bar_config(disable=True)
    one = len(entries) == 1

    def arg(k):
        values = [e[k] for e in entries]
        return values[0] if one else values

    return diffusers_image(
        pipe, model, scheduler, prompt=prompt, steps=steps, guidance=guidance, seed=seed,
        width=64, height=64, image=arg(1), controlnet_conditioning_scale=arg(2),
        control_guidance_start=arg(3), control_guidance_end=arg(4), guess_mode=entries[0][5],
    )  # fmt: skip


DISC, RAMP = _control_image("disc"), _control_image("ramp", 32)  # RAMP is resized to 64
CASES = {
    "one": [("edges", DISC, 1.0, 0.0, 1.0, False)],
    "two": [("edges", DISC, 0.8, 0.0, 1.0, False), ("depth", RAMP, 1.2, 0.0, 1.0, False)],
    "window": [("edges", DISC, 1.0, 0.2, 0.7, False)],
    "guess": [("edges", DISC, 1.0, 0.0, 1.0, True)],
}


@pytest.mark.parametrize("scheduler", ["ddim", "dpmpp_2m"])
@pytest.mark.parametrize("case", list(CASES))
def test_matches_diffusers_controlnet_pipeline(sd, sd_model, case, scheduler):
    """`StableDiffusionControlNetPipeline` (MultiControlNet for two entries) with the same
    folder, nets, control images, scales, window and guess mode."""
    from diffusers import StableDiffusionControlNetPipeline

    entries = CASES[case]
    ours = _solo(sd, entries, scheduler=scheduler)
    theirs = _theirs(StableDiffusionControlNetPipeline, sd_model, sd[3], entries,
                     scheduler=scheduler, safety_checker=None,
                     requires_safety_checker=False)  # fmt: skip
    assert _max_diff(ours, theirs) <= 2
    assert _max_diff(ours, _solo(sd, [], scheduler=scheduler)) > 5  # the control matters


@pytest.mark.parametrize("scheduler", ["euler", "ddim"])
def test_matches_diffusers_sdxl_controlnet_pipeline(sdxl, sdxl_model, scheduler):
    from diffusers import StableDiffusionXLControlNetPipeline

    entries = CASES["one"]
    ours = _solo(sdxl, entries, scheduler=scheduler)
    theirs = _theirs(StableDiffusionXLControlNetPipeline, sdxl_model, sdxl[3], entries,
                     scheduler=scheduler, add_watermarker=False)  # fmt: skip
    assert _max_diff(ours, theirs) <= 2
    assert _max_diff(ours, _solo(sdxl, [], scheduler=scheduler)) > 5


MIXED = {  # no control, A, B, A+B; different steps, schedulers and guidance
    "none": dict(entries=[], steps=6, scheduler="ddim"),
    "a": dict(entries=[("edges", DISC, 1.0, 0.0, 1.0, False)], steps=5, scheduler="dpmpp_2m"),
    "b": dict(entries=[("depth", RAMP, 0.7, 0.0, 0.8, True)], steps=7, scheduler="euler",
              guidance=1.0),
    "ab": dict(entries=[("edges", DISC, 1.0, 0.3, 1.0, False), ("depth", RAMP, 1.0, 0.0, 1.0,
               False)], steps=4, scheduler="ddim", prompt="a blue square"),
}  # fmt: skip


def test_mixed_controls_share_forwards_and_equal_their_solo_runs(sd):
    """Rows without control, with A, with B and with A+B in one step batch, joining at
    different steps: every image equals its solo run, and the U-Net's forwards are shared."""
    _, denoiser, vae, _ = sd
    engine = DenoiseEngine(denoiser.unet, max_batch_size=16)
    jobs = {name: _job(sd, name, **spec) for name, spec in MIXED.items()}
    engine.submit(jobs["none"])
    stats = [engine.step()]  # "none" runs a step alone; the others join at step 1
    for name in ("a", "b", "ab"):
        engine.submit(jobs[name])
    while engine.counts() != (0, 0):
        stats.append(engine.step())
    shared = [s for s in stats if s is not None and len(s.request_ids) == 4]
    assert len(shared) >= 3  # all four in one forward, for the shortest one's steps
    # a (5 steps) and ab (4) are conditioned at every step; b's window ends at 0.8 of 7 steps
    # (steps 0-4); ab's A from 0.3 adds nothing where B already conditions it
    assert sum(s.controlled for s in stats if s is not None) == 5 + 5 + 4
    for name, job in jobs.items():
        alone = _solo(sd, **MIXED[name])
        batched = vae.decode(torch.cat([s.latents for s in job.samples]))[0]
        assert _max_diff(alone, batched) <= 2, name


def test_a_controlnet_of_another_family_does_not_fit(sd, sdxl):
    with pytest.raises(ValueError, match="another model family"):
        check_fits(sdxl[3]["edges"], sd[1].unet, "edges")
    check_fits(sd[3]["edges"], sd[1].unet, "edges")


def test_prepare_image_resizes_to_the_output_size():
    image = prepare_image(_control_image("ramp", 32), width=64, height=48)
    assert image.shape == (1, 3, 48, 64) and image.dtype == F32
    assert float(image.min()) >= 0.0 and float(image.max()) <= 1.0
