"""The diffusion transformers (SD3, FLUX) against diffusers' own pipelines on the same tiny
weights: one image alone, a step batch of requests with different steps, seeds and guidance,
and requests that leave every field unset (the pipelines' defaults). Then what these families
refuse, by name, through the request path (in-process, no Ray)."""

from __future__ import annotations

import asyncio
import dataclasses
import io

import numpy as np
import pytest
import torch
from PIL import Image

from sdserve.api.types import GenerateFields, Result
from sdserve.errors import InvalidArgument
from sdserve.pipeline.dit_denoise import TransformerDenoiser
from sdserve.pipeline.dit_text import ClipEncoders
from sdserve.pipeline.engine import DenoiseEngine
from sdserve.pipeline.vae import VaeDecoder

PROMPT, NEGATIVE = "a red circle on blue", "blurry"


@pytest.fixture(scope="module", params=["sd3", "flux"])
def family(request):
    return request.param


@pytest.fixture(scope="module")
def parts(family, tiny_sd3_model, tiny_flux_model):
    """(folder, ClipEncoders, TransformerDenoiser, VaeDecoder, diffusers pipeline), float32."""
    from diffusers import FluxPipeline, StableDiffusion3Pipeline

    folder = {"sd3": tiny_sd3_model, "flux": tiny_flux_model}[family]
    pipeline_cls = {"sd3": StableDiffusion3Pipeline, "flux": FluxPipeline}[family]
    pipe = pipeline_cls.from_pretrained(folder, dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    return (folder, ClipEncoders(folder, dtype="float32"),
            TransformerDenoiser(folder, dtype="float32"), VaeDecoder(folder, dtype="float32"),
            pipe)  # fmt: skip


def _request(text: ClipEncoders, *, negative="", cfg=False, length=48, **request) -> dict:
    """make_job's keyword arguments for PROMPT, its embeddings encoded as the stages do."""
    clip = text.encode(PROMPT, negative, with_uncond=cfg)
    t5 = text.encode_t5(PROMPT, negative, with_uncond=cfg, max_sequence_length=length)
    return dict(cond=clip.cond, uncond=clip.uncond, pooled=clip.pooled,
                uncond_pooled=clip.uncond_pooled, t5_cond=t5.cond, t5_uncond=t5.uncond,
                **request)  # fmt: skip


def _ours(denoiser, vae, request: dict) -> np.ndarray:
    request = dict(request)
    latents = denoiser.denoise(request.pop("cond"), request.pop("uncond"), **request)
    return vae.decode(latents).astype(int)


def _theirs(pipe, *, width, height, steps, seed, **inputs) -> np.ndarray:
    images = pipe(PROMPT, width=width, height=height, num_inference_steps=steps,
                  generator=torch.Generator("cpu").manual_seed(seed), output_type="np",
                  **inputs).images  # fmt: skip
    return (images * 255).round().astype(int)


# Per family: (our request's guidance settings, diffusers' inputs for the same), the
# guidance-distilled FLUX and FLUX with true CFG both.
MODES = {
    "sd3": [
        (dict(guidance_scale=5.0, negative=NEGATIVE, cfg=True),
         dict(guidance_scale=5.0, negative_prompt=NEGATIVE)),
    ],
    "flux": [
        (dict(guidance_scale=3.5), dict(guidance_scale=3.5)),
        (dict(guidance_scale=2.0, true_cfg_scale=4.0, negative=NEGATIVE, cfg=True),
         dict(guidance_scale=2.0, true_cfg_scale=4.0, negative_prompt=NEGATIVE)),
    ],
}  # fmt: skip


@pytest.mark.parametrize("size", [(64, 64), (48, 80)])
def test_an_image_equals_diffusers(family, parts, size):
    _, text, denoiser, vae, pipe = parts
    width, height = size
    for ours, theirs in MODES[family]:
        request = _request(text, width=width, height=height, steps=5, seeds=[11], **ours)
        expected = _theirs(pipe, width=width, height=height, steps=5, seed=11,
                           max_sequence_length=48, **theirs)  # fmt: skip
        image = _ours(denoiser, vae, request)
        assert image.shape == expected.shape == (1, height, width, 3)
        assert image.std() > 5  # an image, not a flat field that would match anything
        assert np.abs(image - expected).max() <= 2, ours


def test_a_step_batch_keeps_each_images_pixels(family, parts):
    """Requests with different steps, seeds, guidance (and FLUX's true CFG) share forwards,
    and each image stays within 2/255 of its solo run."""
    _, text, denoiser, vae, _ = parts
    settings = [dict(steps=3, seeds=[1], guidance_scale=1.0),
                dict(steps=6, seeds=[2, 3], guidance_scale=4.0),
                dict(steps=4, seeds=[4], guidance_scale=2.5, shift=2.0)]  # fmt: skip
    settings[1].update(negative=NEGATIVE, cfg=True)
    if family == "sd3":
        settings[2].update(cfg=True)  # SD3's guidance is classifier-free: "" as the negative
    else:
        settings[1].update(true_cfg_scale=3.0)
    requests = [_request(text, width=64, height=64, **s) for s in settings]
    solo = [_ours(denoiser, vae, r) for r in requests]
    stats, finished = [], {}
    engine = DenoiseEngine(denoiser.transformer, step=denoiser.step, on_stats=stats.append)
    for i, request in enumerate(requests):
        request = dict(request)

        def on_event(event, i=i):
            if hasattr(event, "latents") and type(event).__name__ == "Finished":
                finished[i] = event.latents

        cond, uncond = request.pop("cond"), request.pop("uncond")
        engine.submit(denoiser.make_job(f"r{i}", cond, uncond, on_event=on_event, **request))
    for _ in range(50):
        if len(finished) == len(requests):
            break
        engine.step()
    for i in range(len(requests)):
        assert np.abs(vae.decode(finished[i]).astype(int) - solo[i]).max() <= 2, i
    shared = [s for s in stats if len(s.request_ids) > 1]
    assert len(shared) >= 3  # the first three steps ran all three requests in one forward
    unconditional = {"sd3": 3, "flux": 2}[family]  # SD3 guides three images, FLUX two
    assert shared[0].batch_size == 4 and shared[0].rows == 4 + unconditional


@pytest.fixture(scope="module")
def path(tiny_sd3_model, tiny_flux_model, tiny_model):
    """The request path (in-process) over an SD3 (its T5 a stage of its own), a FLUX and a
    U-Net model."""
    from sdserve.config import ModelConfig, SdserveConfig
    from sdserve.orchestration.in_process import InProcessStageClient
    from sdserve.orchestration.path import StagePath

    one = {"torch_threads": 1}
    config = SdserveConfig(
        # SD3's T5 as a stage of its own, FLUX's in its TextEncoder
        models=[ModelConfig(name="sd3", path=str(tiny_sd3_model), dtype="float32",
                            stages={"text_encoder_t5": one}),
                ModelConfig(name="flux", path=str(tiny_flux_model), dtype="float32"),
                ModelConfig(name="unet", path=str(tiny_model), dtype="float32")],
        engine={"compile": "off"},
        stages={s: one for s in ("text_encoder", "denoiser", "vae_decoder", "vae_encoder")},
    )  # fmt: skip
    clients = InProcessStageClient.for_every_model(config)
    assert clients["sd3"].text_encoder.part.t5 is None  # the T5 stage has it
    assert clients["sd3"].text_encoder_t5 is not None and clients["flux"].text_encoder_t5 is None
    assert clients["sd3"].vae_encoder is None and clients["unet"].vae_encoder is not None
    yield StagePath(clients, config)
    for client in clients.values():
        client.close()


def _generate(path, **fields) -> Result:
    async def main():
        params = await path.validate(GenerateFields(**fields))
        return [event async for event in path.run(params)][-1]

    return asyncio.run(main())


def _pixels(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).astype(int)


def test_unset_fields_get_the_pipelines_defaults(family, parts, path):
    """Only a prompt and a seed: the pipeline's steps, guidance, sampler, shift and T5 length,
    the model's native size; diffusers given the same prompt and seed (and the size: FLUX's
    pipeline defaults to 1024x1024 whatever the model) makes the same image."""
    *_, pipe = parts
    result = _generate(path, prompt=PROMPT, seed=9, model=family)
    p = result.params
    expected = {"sd3": (28, 7.0, 256), "flux": (28, 3.5, 512)}[family]
    assert (p.steps, p.guidance_scale, p.max_sequence_length) == expected
    assert (p.scheduler, p.shift, p.true_cfg_scale) == ("flow_euler", 0.0, 1.0)
    theirs = _theirs(pipe, width=64, height=64, steps=28, seed=9)[0]
    assert np.abs(_pixels(result.pngs[0]) - theirs).max() <= 2


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        (dict(init_image="png"), "init_image"),
        (dict(loras=(("ink", 1.0),)), "loras"),
        (dict(cache_interval=3), "cache_interval"),
        (dict(scheduler="ddim"), "scheduler"),
        (dict(width=72), "width"),
        (dict(max_sequence_length=513), "max_sequence_length"),
    ],
)
def test_what_a_transformer_does_not_take_is_refused_by_name(path, fields, field):
    if fields.get("init_image") == "png":
        out = io.BytesIO()
        Image.new("RGB", (64, 64)).save(out, format="PNG")
        fields = {"init_image": out.getvalue()}
    with pytest.raises(InvalidArgument) as error:
        asyncio.run(path.validate(GenerateFields(prompt="x", model="flux", **fields)))
    assert error.value.field == field
    if field not in ("width", "max_sequence_length"):
        assert "flux" in str(error.value)


def test_sd3_refuses_true_cfg_and_unets_refuse_transformer_fields(path):
    with pytest.raises(InvalidArgument) as error:
        asyncio.run(path.validate(GenerateFields(prompt="x", model="sd3", true_cfg_scale=2)))
    assert error.value.field == "true_cfg_scale" and "sd3" in str(error.value)
    for fields in (dict(max_sequence_length=64), dict(shift=2.0), dict(scheduler="flow_euler")):
        with pytest.raises(InvalidArgument) as error:
            asyncio.run(path.validate(GenerateFields(prompt="x", model="unet", **fields)))
        assert error.value.field == next(iter(fields))


def test_the_denoiser_stage_refuses_what_a_transformer_does_not_take(path):
    """A stage message that bypasses the request path (another client of the Denoiser) is
    still refused by name."""
    from sdserve.stages.messages import Denoise, EncodeText

    client = path.clients["flux"]
    encode = EncodeText("r", "x", max_sequence_length=16)
    clip, t5 = asyncio.run(client.encode_text(encode)), asyncio.run(client.encode_t5(encode))
    request = Denoise("r", clip, 64, 64, 2, 3.5, "flow_euler", (1,), t5=t5)
    assert asyncio.run(client.denoise(request)).latents.shape == (1, 16, 8, 8)
    for bad, field in ((dict(loras=(("ink", 1.0),)), "loras"),
                       (dict(cache_interval=3), "cache_interval")):  # fmt: skip
        with pytest.raises(InvalidArgument) as error:
            asyncio.run(client.denoise(dataclasses.replace(request, **bad)))
        assert error.value.field == field
