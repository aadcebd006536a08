"""Several models in one server (issue 16): the session's server serves the tiny model (the
default), the built-in model ("shapes"), a tiny SDXL, SD3 and FLUX, each with its own stage
deployments (tests/integration/test_dit_serving.py has the diffusion transformers' own tests).
Requests pick one with `GenerateRequest.model`; `ListModels` and `sdserve models` list them."""

from __future__ import annotations

import io
import json

import grpc
import numpy as np
import pytest
import torch
from helpers import sdserve_cli
from PIL import Image

from sdserve.v1 import diffusion_pb2

pytestmark = pytest.mark.integration

SERVED = ["default", "shapes", "sdxl", "sd3", "flux"]
UNETS = ("default", "shapes", "sdxl")


def _pixels(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"), dtype=np.int16)


def _model_text(png: bytes) -> str:
    return Image.open(io.BytesIO(png)).text["parameters"]


def test_list_models_says_what_each_model_is(stub, tiny_sdxl_model):
    reply = stub.ListModels(diffusion_pb2.ListModelsRequest(), timeout=30)
    assert [m.name for m in reply.models] == SERVED  # the default first
    models = {m.name: m for m in reply.models}
    assert {n: m.family for n, m in models.items()} == {
        "default": "sd1", "shapes": "sd1", "sdxl": "sdxl", "sd3": "sd3", "flux": "flux"
    }  # fmt: skip
    unet = json.loads((tiny_sdxl_model / "unet" / "config.json").read_text())
    native = 8 * unet["sample_size"]
    assert (models["sdxl"].native_width, models["sdxl"].native_height) == (native, native)
    assert all(models[n].prediction_type == "epsilon" for n in UNETS)
    assert all(models[n].default_scheduler == "dpmpp_2m" for n in UNETS)
    for name in ("sd3", "flux"):
        assert (models[name].prediction_type, models[name].default_scheduler) == (
            "flow", "flow_euler"
        )  # fmt: skip
    assert not models["sdxl"].image_inputs and models["shapes"].image_inputs
    assert not any(m.inpainting for m in reply.models)


def test_list_models_says_how_each_stage_computes(stub):
    """Each stage replica reports its dtype: the tiny models pinned to float32, the built-in
    model at `dtype: auto` (bfloat16 on a CPU with bf16 matmuls); eager everywhere here."""
    from sdserve.pipeline import precision

    auto = precision.dtype_name(precision.auto_dtype(torch.device("cpu")))
    reply = stub.ListModels(diffusion_pb2.ListModelsRequest(), timeout=30)
    expected = {"default": "float32", "shapes": auto, "sdxl": "float32", "sd3": "float32",
                "flux": "float32"}  # fmt: skip
    unet = ["text_encoder", "vae_encoder", "denoiser", "vae_decoder"]
    stages = {
        "default": [*unet, "safety_checker"],  # safety: flag (and block for SDXL)
        "sd3": ["text_encoder", "text_encoder_t5", "denoiser", "vae_decoder"],
        "flux": ["text_encoder", "denoiser", "vae_decoder"],
        "sdxl": ["text_encoder", "denoiser", "vae_decoder", "safety_checker"],
    }  # no image inputs; fmt: skip
    for model in reply.models:
        assert [s.stage for s in model.stages] == stages.get(model.name, unet), model.name
        assert {(s.device, s.dtype, s.compile) for s in model.stages} == {
            ("cpu", expected[model.name], "off")
        }, model.name


def test_an_unknown_model_is_invalid_argument_listing_the_served_ones(stub):
    request = diffusion_pb2.GenerateRequest(prompt="x", steps=2, model="sd99")
    with pytest.raises(grpc.RpcError) as err:
        stub.Generate(request, timeout=30)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "model" in err.value.details()
    assert "default, shapes, sdxl, sd3, flux" in err.value.details()
    with pytest.raises(grpc.RpcError) as err:
        stub.SubmitJob(diffusion_pb2.SubmitJobRequest(request=request), timeout=30)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "request.model" in err.value.details()


def test_sdxl_refuses_image_inputs_by_name(stub):
    buffer = io.BytesIO()
    Image.new("RGB", (64, 64), "red").save(buffer, format="PNG")
    request = diffusion_pb2.GenerateRequest(
        prompt="x", steps=2, model="sdxl", init_image=buffer.getvalue()
    )
    with pytest.raises(grpc.RpcError) as err:
        stub.Generate(request, timeout=30)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "init_image" in err.value.details() and "SDXL" in err.value.details()


def _load() -> list[diffusion_pb2.GenerateRequest]:
    """Four requests to the built-in model and four to the tiny SDXL, of mixed steps, sizes,
    samplers and guidance."""
    shapes = [
        diffusion_pb2.GenerateRequest(prompt=p, steps=s, seed=i, scheduler="ddim", model="shapes")
        for i, (p, s) in enumerate([("a red circle on a blue background", 8),
                                    ("a green square on a white background", 6),
                                    ("a blue triangle on a yellow background", 10),
                                    ("a black circle on a red background", 7)])
    ]  # fmt: skip
    sdxl = [
        diffusion_pb2.GenerateRequest(prompt="a cat", steps=6, seed=1, model="sdxl"),
        diffusion_pb2.GenerateRequest(prompt="a dog", negative_prompt="blur", steps=8, seed=2,
                                      model="sdxl", scheduler="euler"),
        diffusion_pb2.GenerateRequest(prompt="a fox", steps=5, seed=3, model="sdxl",
                                      guidance_scale=1.0, width=96, height=64),
        diffusion_pb2.GenerateRequest(prompt="an owl", steps=7, seed=4, model="sdxl",
                                      num_images=2, scheduler="ddim"),
    ]  # fmt: skip
    return [r for pair in zip(shapes, sdxl, strict=True) for r in pair]


def test_the_built_in_model_and_sdxl_in_one_load_each_equal_their_solo_result(stub):
    requests = _load()
    futures = [stub.Generate.future(r, timeout=120) for r in requests]
    together = [f.result(timeout=120) for f in futures]
    for request, reply in zip(requests, together, strict=True):
        assert reply.parameters.model == request.model
        solo = stub.Generate(request, timeout=120)
        assert len(solo.images) == len(reply.images) == max(1, request.num_images)
        for a, b in zip(reply.images, solo.images, strict=True):
            assert f"Model: {request.model}" in _model_text(a.png)
            diff = np.abs(_pixels(a.png) - _pixels(b.png)).max()
            assert diff <= 2, (request, diff)


def test_a_job_runs_on_the_model_it_names(stub):
    request = diffusion_pb2.GenerateRequest(prompt="a heron", steps=4, seed=9, model="sdxl")
    job_id = stub.SubmitJob(diffusion_pb2.SubmitJobRequest(request=request), timeout=30).job_id
    *_, job = stub.WatchJob(diffusion_pb2.GetJobRequest(job_id=job_id), timeout=120)
    assert job.state == diffusion_pb2.JOB_STATE_SUCCEEDED, job
    assert job.result.parameters.model == "sdxl"
    direct = stub.Generate(request, timeout=60)
    diff = np.abs(_pixels(job.result.images[0].png) - _pixels(direct.images[0].png)).max()
    assert diff <= 2


def test_sdserve_models_prints_each_model(server):
    table = sdserve_cli("models", "--server", server.target)
    assert table.returncode == 0, table.stderr
    lines = table.stdout.splitlines()
    assert lines[0].split() == ["NAME", "FAMILY", "SIZE", "PREDICTION", "SAMPLER", "INPUTS",
                                "DEVICE", "DTYPE", "COMPILE"]  # fmt: skip
    assert lines[1].startswith("default (default)") and "sd1" in lines[1]
    assert lines[3].split()[:2] == ["sdxl", "sdxl"] and lines[3].split()[5] == "text"
    assert lines[3].split()[-3:] == ["cpu", "float32", "off"]  # its stages' device and dtype
    listed = json.loads(sdserve_cli("models", "--server", server.target, "--json").stdout)
    assert [m["name"] for m in listed] == SERVED


def test_sdserve_generate_takes_a_model_name(server, tmp_path):
    out = tmp_path / "sdxl.png"
    run = sdserve_cli("generate", "a crane", "--model", "sdxl", "--steps", "3", "--seed", "5",
                      "--server", server.target, "-o", str(out), "-q")  # fmt: skip
    assert run.returncode == 0, run.stderr
    assert "sdxl: 3 steps" in run.stdout
    assert "Model: sdxl" in _model_text(out.read_bytes())
