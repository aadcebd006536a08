"""Image-to-image and inpainting through the request path (`StagePath` over the in-process
stage client, the VaeEncoder stage included): equal to diffusers' own pipelines, batched with
text-to-image requests, and refused with INVALID_ARGUMENT naming the field when malformed."""

from __future__ import annotations

import asyncio
import io

import numpy as np
import pytest
from helpers import EAGER, diffusers_image
from PIL import Image

from sdserve.api.types import GenerateFields, Progress, Result
from sdserve.config import ModelConfig, SdserveConfig
from sdserve.errors import InvalidArgument
from sdserve.orchestration.in_process import InProcessStageClient
from sdserve.orchestration.path import StagePath


def _png(pixels: np.ndarray, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format=fmt)
    return buf.getvalue()


def _init_pixels(width: int = 64, height: int = 64) -> np.ndarray:
    """A smooth color gradient with a darker square: something a VAE can encode."""
    y, x = np.mgrid[0:height, 0:width]
    rgb = np.stack([x * 255 / width, y * 255 / height, np.full_like(x, 128)], axis=-1)
    rgb[height // 4 : height // 2, width // 4 : width // 2] //= 3
    return rgb.astype(np.uint8)


def _mask_pixels(width: int = 64, height: int = 64) -> np.ndarray:
    mask = np.zeros((height, width), np.uint8)
    mask[16:48, 24:56] = 255  # white: repaint
    return mask


INIT, MASK = _init_pixels(), _mask_pixels()


def _pixels(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).astype(int)


@pytest.fixture(scope="module")
def inpaint_path(tiny_inpaint_model):
    """The request path on the 9-channel inpainting model."""
    # float32 and eager, as the diffusers it is compared with
    model = ModelConfig(path=str(tiny_inpaint_model), dtype="float32")
    config = SdserveConfig(model=model, **EAGER)
    client = InProcessStageClient.from_config(config)
    yield StagePath(client, config)
    client.close()


def _pipeline(kind: str, model_dir):
    from diffusers import StableDiffusionImg2ImgPipeline, StableDiffusionInpaintPipeline

    cls = StableDiffusionInpaintPipeline if kind == "inpaint" else StableDiffusionImg2ImgPipeline
    pipe = cls.from_pretrained(model_dir, local_files_only=True, safety_checker=None,
                               requires_safety_checker=False)  # fmt: skip
    pipe.set_progress_bar_config(disable=True)
    return pipe


async def _generate(path, **fields) -> Result:
    params = await path.validate(GenerateFields(**fields))
    return [event async for event in path.run(params)][-1]


def _fields(kind: str, scheduler: str, strength: float, seed: int = 3) -> dict:
    fields = dict(prompt="a red circle", steps=8, guidance_scale=6.0, seed=seed,
                  scheduler=scheduler, init_image=_png(INIT), strength=strength)  # fmt: skip
    if kind == "inpaint":
        fields["mask_image"] = _png(MASK)
    return fields


CASES = [
    (channels, kind, scheduler, strength)
    for scheduler in ("ddim", "euler_ancestral")
    for channels, kind, strength in [
        (4, "img2img", 0.75),
        (4, "inpaint", 0.6),
        (4, "inpaint", 1.0),
        (9, "inpaint", 0.6),
        (9, "inpaint", 1.0),
    ]
]


@pytest.mark.parametrize(("channels", "kind", "scheduler", "strength"), CASES)
def test_equals_diffusers(channels, kind, scheduler, strength, request):
    """Within 2/255 of StableDiffusionImg2ImgPipeline / StableDiffusionInpaintPipeline on the
    same weights, seed and settings (4-channel: blended each step; 9-channel: extra inputs)."""
    model = request.getfixturevalue("tiny_model" if channels == 4 else "tiny_inpaint_model")
    path = request.getfixturevalue("in_process_path" if channels == 4 else "inpaint_path")
    ours = asyncio.run(_generate(path, **_fields(kind, scheduler, strength)))
    inputs = dict(image=Image.fromarray(INIT), strength=strength)
    if kind == "inpaint":
        inputs["mask_image"] = Image.fromarray(MASK, "L")
    theirs = diffusers_image(_pipeline(kind, model), model, scheduler, prompt="a red circle",
                             steps=8, guidance=6.0, seed=3, **inputs)  # fmt: skip
    assert np.abs(_pixels(ours.pngs[0]) - theirs.astype(int)).max() <= 2
    assert ours.params.strength == strength
    assert (
        f"Denoising strength: {strength:g}"
        in Image.open(io.BytesIO(ours.pngs[0])).text["parameters"]
    )


def test_runs_steps_times_strength(in_process_path):
    async def main():
        fields = _fields("img2img", "ddim", 0.7) | {"steps": 10}
        params = await in_process_path.validate(GenerateFields(**fields))
        return [e async for e in in_process_path.run(params, stream=True)]

    progress = [e for e in asyncio.run(main()) if isinstance(e, Progress)]
    assert progress[-1].step == progress[-1].total == 7  # int(10 * 0.7), as diffusers runs


def test_batched_with_text_to_image_equals_solo(in_process_path):
    """Image-to-image and inpainting requests share U-Net forwards with text-to-image ones (at
    other timesteps) and make the same images as alone."""
    path = in_process_path
    img2img = _fields("img2img", "dpmpp_2m", 0.75, seed=11)
    inpaint = _fields("inpaint", "euler_ancestral", 0.6, seed=12)
    text = [dict(prompt=f"text {i}", steps=8, seed=20 + i, scheduler="ddim") for i in range(4)]
    alone = [asyncio.run(_generate(path, **fields)) for fields in (img2img, inpaint)]

    async def together():
        return await asyncio.gather(*[_generate(path, **f) for f in (img2img, inpaint, *text)])

    before = path.client.denoiser.stats_message()
    results = asyncio.run(together())
    after = path.client.denoiser.stats_message()
    assert after.finished - before.finished == 6
    # alone: 6 + 4 + 4 x 8 = 42 forwards; together, the 8 of the longest requests (measured:
    # 8, every one shared), give or take a request joining up to 2 steps late
    assert after.unet_steps - before.unet_steps <= 8 + 2
    assert after.shared_steps - before.shared_steps >= 8 - 2
    for solo, batched in zip(alone, results[:2], strict=True):
        assert np.abs(_pixels(solo.pngs[0]) - _pixels(batched.pngs[0])).max() <= 2


BIG = np.zeros((1032, 1032, 3), np.uint8)  # 1,065,024 pixels: over the default budget


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        (dict(init_image=b"not an image"), "init_image"),
        (dict(init_image=_png(INIT)[:100]), "init_image"),  # truncated
        (dict(init_image=_png(BIG)), "init_image"),
        (dict(init_image=_png(_init_pixels(60, 64))), "init_image"),  # not a multiple of 8
        (dict(mask_image=_png(MASK)), "mask_image"),  # no init image
        (dict(init_image=_png(INIT), mask_image=_png(_mask_pixels(32, 32))), "mask_image"),
        (dict(init_image=_png(INIT), mask_image=_png(INIT, "JPEG")), "mask_image"),
        (dict(init_image=_png(INIT), width=72), "width"),
        (dict(init_image=_png(INIT), strength=0.0), "strength"),
        (dict(init_image=_png(INIT), strength=1.5), "strength"),
        (dict(init_image=_png(INIT), strength=float("nan")), "strength"),
        (dict(init_image=_png(INIT), strength=0.05, steps=10), "strength"),  # no step to run
        (dict(strength=0.5), "strength"),  # no init image
    ],
)
def test_bad_image_inputs_name_their_field(in_process_path, fields, field):
    request = GenerateFields(prompt="x", **fields)
    with pytest.raises(InvalidArgument) as error:
        asyncio.run(in_process_path.validate(request))
    assert error.value.field == field


def test_jpeg_init_image_and_its_size_are_taken(in_process_path):
    request = GenerateFields(prompt="x", init_image=_png(_init_pixels(48, 32), "JPEG"))
    params = asyncio.run(in_process_path.validate(request))
    assert (params.width, params.height, params.strength) == (48, 32, 0.8)  # 0.8: the default


def test_an_inpainting_model_needs_image_and_mask(inpaint_path):
    for fields in (dict(), dict(init_image=_png(INIT))):
        request = GenerateFields(prompt="x", **fields)
        with pytest.raises(InvalidArgument) as error:
            asyncio.run(inpaint_path.validate(request))
        assert error.value.field == "mask_image"
