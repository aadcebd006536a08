"""SDXL and SD 2.x (v-prediction) in the pipeline layer: equal to diffusers' own pipelines on
the tiny random-weight folders (`make-tiny-model --arch tiny-sdxl | tiny-sd2`), per-row added
conditioning in a shared batch, DeepCache with SDXL's added embedding, and the model families."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import diffusers_image, solo_latents

from sdserve.pipeline import deepcache, models
from sdserve.pipeline.denoise import Denoiser
from sdserve.pipeline.engine import DenoiseEngine
from sdserve.pipeline.text import PromptEmbeddings, TextEncoder
from sdserve.pipeline.vae import VaeDecoder
from sdserve.testing.tiny import make_tiny_model


@pytest.fixture(scope="module")
def sdxl_model(tiny_sdxl_model) -> Path:
    """The session's tiny SDXL folder (tests/conftest.py)."""
    return tiny_sdxl_model


@pytest.fixture(scope="module")
def sd2_model(tmp_path_factory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("models") / "tiny-sd2", arch="tiny-sd2")


@pytest.fixture(scope="module")
def sdxl(sdxl_model):
    f32 = "float32"  # compared with diffusers in float32
    return (TextEncoder(sdxl_model, dtype=f32), Denoiser(sdxl_model, dtype=f32),
            VaeDecoder(sdxl_model, dtype=f32))  # fmt: skip


@pytest.fixture(scope="module")
def sdxl_pipe(sdxl_model):
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(
        sdxl_model, dtype=torch.float32, add_watermarker=False, local_files_only=True
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _max_diff(a: np.ndarray, b: np.ndarray) -> int:
    return int(np.abs(a.astype(int) - b.astype(int)).max())


def _ours(stages, **kwargs) -> np.ndarray:
    text, denoiser, vae = stages
    return vae.decode(solo_latents(text, denoiser, **kwargs))[0]


CALL = dict(prompt="a red circle", steps=6, width=64, height=48)  # not square: (h, w) order


@pytest.mark.parametrize(
    ("scheduler", "negative_prompt", "guidance"),
    [("euler", "blurry", 7.5), ("dpmpp_2m", "blurry", 7.5), ("ddim", "", 5.0),
     ("euler_ancestral", "", 1.0)],
)  # fmt: skip
def test_sdxl_matches_diffusers(sdxl, sdxl_model, sdxl_pipe, scheduler, negative_prompt,
                                guidance):  # fmt: skip
    """`StableDiffusionXLPipeline` with the same folder, scheduler and seed; "" as the negative
    prompt is diffusers' None: zero embeddings (force_zeros_for_empty_prompt)."""
    kwargs = dict(CALL, negative_prompt=negative_prompt, guidance=guidance)
    ours = _ours(sdxl, seeds=[7], scheduler=scheduler, **kwargs)
    theirs = diffusers_image(sdxl_pipe, sdxl_model, scheduler, seed=7, **kwargs)
    assert ours.shape == theirs.shape == (48, 64, 3)
    assert _max_diff(ours, theirs) <= 2


def test_sdxl_embeddings(sdxl):
    text, _, _ = sdxl
    emb = text.encode("a red circle", "")
    assert isinstance(emb, PromptEmbeddings)
    assert emb.cond.shape == (1, 77, 64)  # both encoders' 32 side by side
    assert emb.pooled.shape == emb.uncond_pooled.shape == (1, 32)
    assert not emb.uncond.any() and not emb.uncond_pooled.any()  # zeros for ""
    negative = text.encode("a red circle", "blurry")
    assert negative.uncond.abs().sum() > 0 and negative.uncond_pooled.abs().sum() > 0
    assert text.encode("x", "blurry", with_uncond=False).uncond_pooled is None
    text.force_zeros_for_empty_prompt = False  # a folder that sets it false encodes ""
    try:
        assert text.encode("a red circle", "").uncond.abs().sum() > 0
    finally:
        text.force_zeros_for_empty_prompt = True
    text.calibration_forward(2)


def _run_engine(engine, limit=200):
    stats = []
    for _ in range(limit):
        s = engine.step()
        if s is None and engine.counts() == (0, 0):
            return stats
        if s is not None:
            stats.append(s)
    raise AssertionError("engine did not drain")


SPECS = {  # two schedulers, step counts and guidances in one shape; a third size of its own
    "a": dict(prompt="a blue square", negative_prompt="blurry", guidance=7.5, steps=6,
              scheduler="euler", seeds=(1,)),
    "b": dict(prompt="a green dot", guidance=1.0, steps=4, scheduler="dpmpp_2m", seeds=(2, 3)),
    "c": dict(prompt="a red circle", guidance=5.0, steps=5, scheduler="ddim", seeds=(4,),
              height=48),
}  # fmt: skip


def _job(stages, request_id, *, prompt, negative_prompt="", guidance, width=64, height=64,
         **kwargs):  # fmt: skip
    text, denoiser, _ = stages
    emb = text.encode(prompt, negative_prompt, with_uncond=guidance > 1)
    return denoiser.make_job(request_id, emb.cond, emb.uncond, pooled=emb.pooled,
                             uncond_pooled=emb.uncond_pooled, width=width, height=height,
                             guidance_scale=guidance, **kwargs)  # fmt: skip


def test_sdxl_requests_batched_equal_their_solo_results(sdxl):
    """Each row gets its own pooled embeddings and size conditioning: requests of different
    steps, schedulers and guidance share forwards and still give their solo pixels."""
    _, denoiser, vae = sdxl
    engine = DenoiseEngine(denoiser.unet, max_batch_size=16)
    jobs = {name: _job(sdxl, name, **spec) for name, spec in SPECS.items()}
    for job in jobs.values():
        engine.submit(job)
    stats = _run_engine(engine)
    assert any({"a", "b"} <= set(s.request_ids) for s in stats)  # they shared forwards
    assert any(s.rows == 2 + 2 for s in stats)  # a's two rows and b's two unguided images
    for name, job in jobs.items():
        spec = dict(SPECS[name], seeds=list(SPECS[name]["seeds"]))
        spec["width"], spec["height"] = 64, spec.get("height", 64)
        alone = vae.decode(solo_latents(sdxl[0], denoiser, **spec))
        batched = vae.decode(torch.cat([s.latents for s in job.samples]))
        assert _max_diff(alone, batched) <= 2, name


def test_sdxl_unet_needs_pooled_embeddings(sdxl):
    text, denoiser, _ = sdxl
    emb = text.encode("a red circle", "blurry")
    common = dict(width=64, height=64, steps=2, guidance_scale=7.5, scheduler="ddim", seeds=[0])
    with pytest.raises(ValueError, match="pooled"):
        denoiser.make_job("x", emb.cond, emb.uncond, **common)
    with pytest.raises(ValueError, match="pooled"):
        denoiser.make_job("x", emb.cond, emb.uncond, pooled=emb.pooled, **common)
    with pytest.raises(ValueError, match="width"):
        wrong = torch.zeros(1, 16)
        denoiser.make_job("x", emb.cond, emb.uncond, pooled=wrong, uncond_pooled=wrong, **common)
    job = denoiser.make_job("x", emb.cond, emb.uncond, pooled=emb.pooled,
                            uncond_pooled=emb.uncond_pooled, **dict(common, height=48))  # fmt: skip
    assert job.samples[0].text_time.time_ids.tolist() == [[48, 64, 0, 0, 48, 64]]
    denoiser.calibration_forward(3)


@pytest.mark.parametrize("levels", [0, 1])
def test_deepcache_shallow_branch_includes_the_added_embedding(sdxl, levels):
    """With deep features cached from this very input, the shallow forward of an SDXL U-Net
    (time embedding plus the pooled text and size embedding) is the full forward."""
    unet = sdxl[1].unet
    torch.manual_seed(0)
    x = torch.randn(3, 4, 8, 8)
    t = torch.tensor([999.0, 500.0, 20.0])
    context = torch.randn(3, 77, unet.config.cross_attention_dim)
    added = {"text_embeds": torch.randn(3, 32), "time_ids": torch.tensor([[64.0, 64, 0, 0, 64,
                                                                           64]] * 3)}  # fmt: skip
    with torch.inference_mode(), deepcache.capture(unet, levels) as captured:
        full = unet(x, t, encoder_hidden_states=context, added_cond_kwargs=added)[0]
    shallow = deepcache.shallow_forward(unet, x, t, context, captured[0], levels, added)
    torch.testing.assert_close(shallow, full, rtol=1e-5, atol=1e-5)
    wrong = deepcache.shallow_forward(unet, x, t, context, captured[0], levels,
                                      dict(added, text_embeds=torch.zeros(3, 32)))  # fmt: skip
    assert (wrong - full).abs().max() > 1e-3  # the added embedding matters


def test_deepcache_rows_beside_exact_sdxl_rows(sdxl):
    """A cached SDXL request runs in the same batch as an exact one; the exact one's pixels
    are its solo pixels."""
    _, denoiser, vae = sdxl
    spec = dict(prompt="a blue square", negative_prompt="blurry", guidance=7.5, steps=6,
                scheduler="ddim")  # fmt: skip
    engine = DenoiseEngine(denoiser.unet, max_batch_size=16)
    exact = _job(sdxl, "exact", seeds=[5], **spec)
    cached = _job(sdxl, "cached", seeds=[6], cache_interval=2, **spec)
    engine.submit(exact)
    engine.submit(cached)
    stats = _run_engine(engine)
    assert all(set(s.request_ids) == {"exact", "cached"} for s in stats)
    alone = vae.decode(solo_latents(sdxl[0], denoiser, seeds=[5], **spec))
    assert _max_diff(alone, vae.decode(exact.samples[0].latents)) <= 2
    cached_pixels = vae.decode(cached.samples[0].latents)
    exact_6 = vae.decode(solo_latents(sdxl[0], denoiser, seeds=[6], **spec))
    assert torch.isfinite(cached.samples[0].latents).all() and _max_diff(cached_pixels, exact_6) > 0


@pytest.mark.parametrize("scheduler", ["ddim", "dpmpp_2m", "euler"])
def test_sd2_v_prediction_matches_diffusers(sd2_model, scheduler):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(sd2_model, dtype=torch.float32,
                                                   local_files_only=True)  # fmt: skip
    pipe.set_progress_bar_config(disable=True)
    f32 = "float32"  # as the pipeline above
    stages = (TextEncoder(sd2_model, dtype=f32), Denoiser(sd2_model, dtype=f32),
              VaeDecoder(sd2_model, dtype=f32))  # fmt: skip
    assert stages[1].prediction_type == "v_prediction"
    kwargs = dict(CALL, negative_prompt="blurry", guidance=7.5)
    ours = _ours(stages, seeds=[3], scheduler=scheduler, **kwargs)
    theirs = diffusers_image(pipe, sd2_model, scheduler, seed=3, **kwargs)
    assert _max_diff(ours, theirs) <= 2


def test_model_families(tiny_model, sd2_model, sdxl_model, sdxl):
    assert models.model_family(tiny_model) == "sd1"
    assert models.model_family(sd2_model) == "sd2"
    assert models.model_family(sdxl_model) == "sdxl"
    text, denoiser, _ = sdxl
    assert (text.family, denoiser.family, denoiser.prediction_type) == ("sdxl", "sdxl", "epsilon")
    assert Denoiser(tiny_model).family == "sd1"
    assert TextEncoder(sd2_model).family == "sd2"
    models.check_model_dir(sdxl_model, (*models.PARTS, *models.XL_PARTS))


def test_tiny_sdxl_is_reproducible(sdxl_model, tmp_path):
    again = make_tiny_model(tmp_path / "again", arch="tiny-sdxl")
    files = sorted(p.relative_to(again) for p in again.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(sdxl_model) for p in sdxl_model.rglob("*") if p.is_file())
    assert all((again / f).read_bytes() == (sdxl_model / f).read_bytes() for f in files)


def test_sdxl_vae_upcasts_float16_and_denormalizes(sdxl_model, tiny_model):
    """As `StableDiffusionXLPipeline` decodes: float32 for a float16 VAE with force_upcast
    (SD 1.x's pipeline does not upcast), and latents * std / scaling_factor + mean."""
    from diffusers import AutoencoderKL

    assert VaeDecoder(sdxl_model, dtype="float16").vae.dtype == torch.float32
    assert VaeDecoder(tiny_model, dtype="float16").vae.dtype == torch.float16
    vae = AutoencoderKL.from_pretrained(sdxl_model / "vae")
    assert vae.config.scaling_factor == 0.13025
    mean, std = [0.1, -0.2, 0.3, 0.0], [0.9, 1.1, 1.0, 0.5]
    normalized = AutoencoderKL.from_config(dict(vae.config, latents_mean=mean, latents_std=std))
    normalized.load_state_dict(vae.state_dict())
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    unscaled = latents * torch.tensor(std).view(1, 4, 1, 1) / 0.13025
    unscaled = unscaled + torch.tensor(mean).view(1, 4, 1, 1)
    with torch.inference_mode():
        expected = normalized.eval().decode(unscaled, return_dict=False)[0]
    expected = ((expected / 2 + 0.5).clamp(0, 1) * 255).round().permute(0, 2, 3, 1).numpy()
    ours = VaeDecoder.from_parts(normalized.eval()).decode(latents)
    assert _max_diff(ours, expected.astype(np.uint8)) <= 1
    plain = VaeDecoder.from_parts(vae.eval()).decode(latents)
    assert _max_diff(ours, plain) > 2  # the mean and std changed the pixels


def test_embeddings_are_a_dataclass_for_sd1(tiny_model):
    emb = TextEncoder(tiny_model, dtype="float32").encode("a red circle", "", with_uncond=False)
    assert emb.uncond is None and emb.pooled is None and emb.uncond_pooled is None
    with pytest.raises(dataclasses.FrozenInstanceError):
        emb.cond = None


@pytest.mark.parametrize("scheduler", ["ddim", "euler"])
def test_sdxl_cache_interval_equals_the_deepcache_package(sdxl, sdxl_model, sdxl_pipe,
                                                          scheduler):  # fmt: skip
    """DeepCacheSDHelper (the paper's code) on diffusers' SDXL pipeline, branch 0, interval 3:
    the same pixels as our cached rows."""
    from DeepCache import DeepCacheSDHelper

    kwargs = dict(CALL, negative_prompt="blurry", guidance=7.5, steps=7)
    text, denoiser, vae = sdxl
    emb = text.encode(kwargs["prompt"], kwargs["negative_prompt"])
    latents = denoiser.denoise(emb.cond, emb.uncond, pooled=emb.pooled,
                               uncond_pooled=emb.uncond_pooled, width=64, height=48, steps=7,
                               guidance_scale=7.5, scheduler=scheduler, seeds=[9],
                               cache_interval=3)  # fmt: skip
    ours = vae.decode(latents)[0]
    helper = DeepCacheSDHelper(pipe=sdxl_pipe)
    helper.set_params(cache_interval=3, cache_branch_id=0)
    helper.enable()
    try:
        theirs = diffusers_image(sdxl_pipe, sdxl_model, scheduler, seed=9, **kwargs)
    finally:
        helper.disable()
    exact = diffusers_image(sdxl_pipe, sdxl_model, scheduler, seed=9, **kwargs)
    assert _max_diff(ours, theirs) <= 2
    assert _max_diff(ours, exact) > 2  # the shallow steps changed something
