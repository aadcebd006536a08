"""Request validation and the public request's conversion (no Ray, no model)."""

import io
import math

import pytest
from PIL import Image

from sdserve.api.proto import fields_from_pb, params_to_pb
from sdserve.api.types import GenerateFields
from sdserve.api.validate import validate_fields
from sdserve.config import DefaultsConfig, LimitsConfig
from sdserve.errors import InvalidArgument
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
    return _parse_pb(diffusion_pb2.GenerateRequest(**{"prompt": "a cat", **fields}))


def _parse_pb(request: diffusion_pb2.GenerateRequest):
    fields = fields_from_pb(request)
    return validate_fields(fields, limits=LIMITS, defaults=DEFAULTS, native_size=(64, 48))


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
    assert params_to_pb(params).HasField("seed")
    again = fields_from_pb(params_to_pb(params))
    assert validate_fields(again, limits=LIMITS, defaults=DEFAULTS, native_size=(8, 8)) == params


def test_unset_fields_are_none_and_set_zeros_are_kept():
    """The request's `optional` fields: unset is None (the default applies), a 0 sent stays 0
    (and is refused where 0 is invalid)."""
    request = diffusion_pb2.GenerateRequest(prompt="a cat", steps=0, guidance_scale=0.0)
    request.loras.add(name="grain")
    request.loras.add(name="ink", scale=0.7)
    fields = fields_from_pb(request)
    assert (fields.steps, fields.guidance_scale) == (0, 0.0)
    assert fields.width is None and fields.seed is None and fields.strength is None
    assert fields.loras[0] == ("grain", None)
    assert fields.loras[1][0] == "ink" and fields.loras[1][1] == pytest.approx(0.7)
    assert fields == GenerateFields(prompt="a cat", steps=0, guidance_scale=0.0,
                                    loras=fields.loras)  # fmt: skip


def test_png_parameters_text():
    params = _parse(negative_prompt="blurry", seed=5, steps=20, scheduler="ddim")
    text = params.png_parameters(5, "tiny")
    assert text.splitlines()[0] == "a cat"
    assert text.splitlines()[1] == "Negative prompt: blurry"
    assert "Steps: 20, Sampler: ddim, CFG scale: 7.5, Seed: 5, Size: 64x48, Model: tiny" in text


def test_float32_fields_come_back_as_the_client_wrote_them():
    """The request's floats are float32 on the wire (0.7 arrives as 0.69999999, and 10 steps
    at that strength would run 6, not diffusers' 7): validation rounds them to six decimals."""
    init = io.BytesIO()
    Image.new("RGB", (64, 48)).save(init, format="PNG")
    request = diffusion_pb2.GenerateRequest(prompt="a cat", init_image=init.getvalue(),
                                            strength=0.7, steps=10, guidance_stop=0.4)  # fmt: skip
    request.loras.add(name="ink", scale=0.3)
    assert request.strength != 0.7
    params = _parse_pb(request)
    assert (params.strength, params.guidance_stop, params.loras) == (0.7, 0.4, (("ink", 0.3),))
    assert int(params.steps * params.strength) == 7
