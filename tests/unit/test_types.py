"""Request validation and tensor messages (no Ray, no model)."""

import math

import pytest
import torch

from sdserve.config import DefaultsConfig, LimitsConfig
from sdserve.errors import InvalidArgument
from sdserve.stages.tensors import tensor_from_pb, tensor_to_pb
from sdserve.types import GenerateParams
from sdserve.v1 import diffusion_pb2

LIMITS = LimitsConfig(
    max_prompt_chars=50,
    min_size=16,
    max_size=256,
    max_pixels=128 * 128,
    max_steps=150,
    max_num_images=4,
)
DEFAULTS = DefaultsConfig(steps=25, guidance_scale=7.5, scheduler="dpmpp_2m")

BAD_REQUESTS = [
    ("prompt", {"prompt": ""}),
    ("prompt", {"prompt": "   "}),
    ("prompt", {"prompt": "x" * 51}),
    ("negative_prompt", {"negative_prompt": "x" * 51}),
    ("width", {"width": 100}),
    ("height", {"height": 60}),
    ("width", {"width": 8}),
    ("height", {"height": 512}),
    ("width", {"width": 256, "height": 256}),
    ("steps", {"steps": 0}),
    ("steps", {"steps": 151}),
    ("guidance_scale", {"guidance_scale": math.nan}),
    ("guidance_scale", {"guidance_scale": math.inf}),
    ("guidance_scale", {"guidance_scale": -1.0}),
    ("scheduler", {"scheduler": "lms"}),
    ("num_images", {"num_images": 0}),
    ("num_images", {"num_images": 5}),
]


def _parse(**fields):
    request = diffusion_pb2.GenerateRequest(**{"prompt": "a cat", **fields})
    return GenerateParams.from_pb(request, limits=LIMITS, defaults=DEFAULTS, native_size=(64, 48))


@pytest.mark.parametrize(("field", "fields"), BAD_REQUESTS)
def test_bad_input_names_the_field(field, fields):
    with pytest.raises(InvalidArgument) as err:
        _parse(**fields)
    assert err.value.field == field
    assert str(err.value).startswith(f"{field}: ")
    assert err.value.code == "INVALID_ARGUMENT"


def test_defaults_fill_unset_fields():
    params = _parse()
    assert (params.width, params.height) == (64, 48)
    assert (params.steps, params.guidance_scale, params.scheduler) == (25, 7.5, "dpmpp_2m")
    assert params.num_images == 1
    assert 0 <= params.seed < 2**32  # the server picked one
    assert params.guided


def test_explicit_values_are_kept():
    params = _parse(
        width=128,
        height=32,
        steps=3,
        guidance_scale=0.0,
        scheduler="ddpm",
        seed=2**64 - 1,
        num_images=3,
    )
    assert (params.width, params.height, params.steps) == (128, 32, 3)
    assert params.guidance_scale == 0.0 and not params.guided
    assert params.seeds == [2**64 - 1, 0, 1]
    assert params.to_pb().HasField("seed")
    assert (
        GenerateParams.from_pb(params.to_pb(), limits=LIMITS, defaults=DEFAULTS, native_size=(8, 8))
        == params
    )


def test_png_parameters_text():
    params = _parse(negative_prompt="blurry", seed=5, steps=20, scheduler="ddim")
    text = params.png_parameters(5, "tiny")
    assert text.splitlines()[0] == "a cat"
    assert text.splitlines()[1] == "Negative prompt: blurry"
    assert "Steps: 20, Sampler: ddim, CFG scale: 7.5, Seed: 5, Size: 64x48, Model: tiny" in text


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.int64])
def test_tensor_round_trip(dtype):
    t = (torch.randn(2, 3, 5) * 100).to(dtype)
    msg = tensor_to_pb(t)
    assert msg.dtype == str(dtype).removeprefix("torch.")
    assert list(msg.shape) == [2, 3, 5]
    back = tensor_from_pb(type(msg).FromString(msg.SerializeToString()))
    assert back.dtype == dtype and torch.equal(back, t)


def test_tensor_unknown_dtype():
    msg = tensor_to_pb(torch.zeros(2))
    msg.dtype = "Tensor"
    with pytest.raises(ValueError, match="unknown tensor dtype"):
        tensor_from_pb(msg)
