"""The diffusion transformers' request fields (`max_sequence_length`, `true_cfg_scale`, `shift`)
through every public edge: the gRPC request and its stored job, the generic bounds, the PNG
text, the HTTP body, the Python client, the CLI, and ListModels (no Ray; the HTTP test drives
the in-process request path on the tiny U-Net model, which refuses what it does not take)."""

from __future__ import annotations

import math

import pytest

from sdserve.api.proto import fields_from_pb, params_to_pb, resolved_to_pb, served_model_to_pb
from sdserve.api.served_models import ServedModel
from sdserve.api.validate import validate_fields
from sdserve.config import DefaultsConfig, LimitsConfig
from sdserve.constants import MAX_SEQUENCE_LENGTH
from sdserve.errors import InvalidArgument
from sdserve.v1 import diffusion_pb2

DIT = ("max_sequence_length", "true_cfg_scale", "shift")
KWARGS = dict(limits=LimitsConfig(), defaults=DefaultsConfig(), native_size=(64, 64))


def _params(**fields):
    request = diffusion_pb2.GenerateRequest(prompt="a cat", seed=1, **fields)
    return validate_fields(fields_from_pb(request), **KWARGS)


# --- gRPC request -> GenerateFields -> GenerateParams -> stored job / reply -----------------


def test_unset_fields_stay_unset_through_the_stored_job():
    """A U-Net model's request: None as sent, the unset values validated, none set in the
    stored job (a U-Net model would refuse them when the job is validated again)."""
    fields = fields_from_pb(diffusion_pb2.GenerateRequest(prompt="a cat"))
    assert [getattr(fields, name) for name in DIT] == [None, None, None]
    params = _params()
    assert (params.max_sequence_length, params.true_cfg_scale, params.shift) == (0, 1.0, 0.0)
    stored = params_to_pb(params)
    assert not any(stored.HasField(name) for name in DIT)
    resolved = resolved_to_pb(params)
    assert (resolved.max_sequence_length, resolved.true_cfg_scale, resolved.shift) == (0, 1, 0)


def test_set_fields_come_back_as_sent_and_survive_the_stored_job():
    params = _params(max_sequence_length=128, true_cfg_scale=1.1, shift=3.2)
    assert params.true_cfg_scale != diffusion_pb2.GenerateRequest(true_cfg_scale=1.1).true_cfg_scale
    assert (params.max_sequence_length, params.true_cfg_scale, params.shift) == (128, 1.1, 3.2)
    stored = params_to_pb(params)
    assert all(stored.HasField(name) for name in DIT)
    assert validate_fields(fields_from_pb(stored), **KWARGS) == params
    resolved = resolved_to_pb(params)
    assert resolved.max_sequence_length == 128
    assert resolved.true_cfg_scale == pytest.approx(1.1) and resolved.shift == pytest.approx(3.2)


def test_a_set_zero_is_not_unset():
    fields = fields_from_pb(diffusion_pb2.GenerateRequest(prompt="x", true_cfg_scale=0.0))
    assert fields.true_cfg_scale == 0.0
    assert _params(true_cfg_scale=0.0).true_cfg_scale == 0.0


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("max_sequence_length", 0),
        ("max_sequence_length", MAX_SEQUENCE_LENGTH + 1),
        ("true_cfg_scale", -0.5),
        ("true_cfg_scale", math.nan),
        ("true_cfg_scale", math.inf),
        ("shift", 0.0),
        ("shift", -1.0),
        ("shift", math.nan),
        ("shift", math.inf),
    ],
)
def test_each_bound_is_refused_naming_its_field(field, value):
    with pytest.raises(InvalidArgument) as err:
        _params(**{field: value})
    assert err.value.field == field and err.value.code == "INVALID_ARGUMENT"
    assert str(err.value).startswith(f"{field}: must be")


def test_the_bounds_themselves_are_taken():
    assert _params(max_sequence_length=1).max_sequence_length == 1
    assert _params(max_sequence_length=MAX_SEQUENCE_LENGTH).max_sequence_length == 512
    assert _params(shift=0.001).shift == 0.001


def test_png_parameters_name_them_only_when_set():
    unset = _params().png_parameters(1, "tiny")
    for label in ("Max sequence length", "True CFG scale", "Shift"):
        assert label not in unset
    text = _params(max_sequence_length=256, true_cfg_scale=4.0, shift=3.0).png_parameters(1)
    assert "Max sequence length: 256, True CFG scale: 4, Shift: 3, Generator: sdserve" in text
    assert "True CFG scale" in _params(true_cfg_scale=0.5).png_parameters(1)


# --- HTTP -------------------------------------------------------------------------------------


def test_the_http_body_carries_them_and_names_bad_ones():
    from sdserve.http.openai_images import generation_body, parse_generation

    body = {"prompt": "x", "max_sequence_length": 128, "true_cfg_scale": 4, "shift": 3.5}
    request = parse_generation(body).request
    assert (request.max_sequence_length, request.true_cfg_scale, request.shift) == (128, 4, 3.5)
    assert parse_generation(generation_body(request)).request == request
    assert not any(parse_generation({"prompt": "x"}).request.HasField(name) for name in DIT)
    for name, value in (("max_sequence_length", "long"), ("max_sequence_length", 1.5),
                        ("max_sequence_length", -1), ("max_sequence_length", 2**33),
                        ("true_cfg_scale", "4"), ("shift", True)):  # fmt: skip
        with pytest.raises(InvalidArgument) as err:
            parse_generation({"prompt": "x", name: value})
        assert err.value.field == name, (name, value)


@pytest.fixture(scope="module")
def http(in_process_path):
    from starlette.applications import Starlette
    from starlette.routing import Route
    from starlette.testclient import TestClient

    from sdserve.http.app import HttpApi

    api = HttpApi(in_process_path)

    async def endpoint(request):
        return await api.handle(request, "req-test")

    return TestClient(Starlette(routes=[Route("/{path:path}", endpoint, methods=["POST"])]))


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"max_sequence_length": MAX_SEQUENCE_LENGTH + 1}, "max_sequence_length"),
        ({"shift": 0}, "shift"),
        ({"true_cfg_scale": -1}, "true_cfg_scale"),
        ({"true_cfg_scale": 4.0}, "true_cfg_scale"),  # the tiny U-Net model takes none of them
        ({"max_sequence_length": 77}, "max_sequence_length"),
        ({"shift": 3}, "shift"),
    ],
)
def test_the_http_api_answers_400_naming_the_field(http, body, param):
    reply = http.post("/v1/images/generations", json={"prompt": "x", **body})
    assert reply.status_code == 400, reply.text
    error = reply.json()["error"]
    assert error["param"] == param and error["code"] == "invalid_argument"


# --- The Python client and the CLI ------------------------------------------------------------


def test_the_client_sends_what_is_given():
    from sdserve.client import Parameters, _calls
    from sdserve.client._calls import generate_request

    request = generate_request("x", {"max_sequence_length": 128, "true_cfg_scale": None,
                                     "shift": 3.0})  # fmt: skip
    assert request.max_sequence_length == 128 and request.shift == 3.0
    assert not request.HasField("true_cfg_scale")
    submitted = _calls.submit("x", "normal", None, {"true_cfg_scale": 4.0}).request.request
    streamed = _calls.stream("x", 0, {"max_sequence_length": 64}).request
    assert submitted.true_cfg_scale == 4 and streamed.max_sequence_length == 64
    resolved = diffusion_pb2.ResolvedParameters(max_sequence_length=512, true_cfg_scale=1.1,
                                                shift=3.2)  # fmt: skip
    parameters = Parameters.from_pb(resolved)
    assert (parameters.max_sequence_length, parameters.true_cfg_scale, parameters.shift) == (
        512, 1.1, 3.2)  # fmt: skip


@pytest.mark.parametrize("command", ["generate", "submit"])
def test_the_cli_flags_go_into_the_request(command):
    from sdserve.cli import build_parser
    from sdserve.cli.options import request_options
    from sdserve.client._calls import generate_request

    args = build_parser().parse_args([command, "a cat", "--max-sequence-length", "128",
                                      "--true-cfg-scale", "4", "--shift", "3"])  # fmt: skip
    request = generate_request(args.prompt, request_options(args))
    assert (request.max_sequence_length, request.true_cfg_scale, request.shift) == (128, 4, 3)
    unset = build_parser().parse_args([command, "a cat"])
    assert not any(generate_request("x", request_options(unset)).HasField(n) for n in DIT)


def test_the_loadtest_mixes_them():
    from sdserve.cli import build_parser
    from sdserve.cli.loadtest import mix_of

    args = build_parser().parse_args(["loadtest", "--max-sequence-length", "128,256",
                                      "--true-cfg-scale", "4", "--shift", "3"])  # fmt: skip
    mix = mix_of(args)
    assert [mix.request(i).max_sequence_length for i in range(3)] == [128, 256, 128]
    assert mix.request(1).true_cfg_scale == 4 and mix.request(1).shift == 3
    plain = mix_of(build_parser().parse_args(["loadtest"])).request(0)
    assert not any(plain.HasField(name) for name in DIT)


@pytest.mark.parametrize("command", ["generate", "submit", "loadtest"])
def test_the_cli_help_explains_them(command, capsys):
    from sdserve.cli import build_parser

    with pytest.raises(SystemExit):
        build_parser().parse_args([command, "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for flag in ("--max-sequence-length", "--true-cfg-scale", "--shift"):
        assert flag in text
    assert "T5 tokens" in text and "flux only" in text and "sigma shift" in text


# --- ListModels -------------------------------------------------------------------------------


def _info(family: str, in_channels: int):
    from sdserve.stages.messages import DenoiserInfo, StageInfo

    return DenoiserInfo(native_width=1024, native_height=1024, vae_scale_factor=8,
                        unet_in_channels=in_channels, family=family, prediction_type="flow",
                        loras=(), stage=StageInfo("denoiser", "cuda", "bfloat16"))  # fmt: skip


@pytest.mark.parametrize(("family", "in_channels"), [("sd3", 16), ("flux", 64)])
def test_a_transformer_model_is_listed_with_its_family_and_sampler(family, in_channels):
    model = ServedModel.from_info("big", _info(family, in_channels), "euler")
    assert (model.family, model.default_scheduler) == (family, "flow_euler")
    assert not model.image_inputs and not model.inpainting
    pb = served_model_to_pb(model)
    assert (pb.family, pb.default_scheduler, pb.image_inputs) == (family, "flow_euler", False)
    unet = ServedModel.from_info("small", _info("sd1", 9), "euler")
    assert unet.inpainting and unet.image_inputs and unet.default_scheduler == "euler"


def test_sdserve_models_shows_the_family(monkeypatch, capsys):
    from sdserve.cli import build_parser, options
    from sdserve.client import ModelInfo

    models = [ModelInfo.from_pb(served_model_to_pb(ServedModel.from_info(name, _info(f, c), "")))
              for name, f, c in (("sd35", "sd3", 16), ("flux-dev", "flux", 64))]  # fmt: skip

    class _Client:
        def __enter__(self):
            return self

        def __exit__(self, *exc_info):
            pass

        def models(self):
            return models

    monkeypatch.setattr(options, "client", lambda args: _Client())
    args = build_parser().parse_args(["models"])
    assert args.func(args) == 0
    rows = [line.split() for line in capsys.readouterr().out.splitlines()]
    assert rows[0][:6] == ["NAME", "FAMILY", "SIZE", "PREDICTION", "SAMPLER", "INPUTS"]
    assert rows[1][:7] == ["sd35", "(default)", "sd3", "1024x1024", "flow", "flow_euler", "text"]
    assert rows[2][:6] == ["flux-dev", "flux", "1024x1024", "flow", "flow_euler", "text"]
