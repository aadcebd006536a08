"""The diffusion transformers served by the session's app: "sd3" (its T5 in a TextEncoderT5
deployment of its own) and "flux" (T5 in its TextEncoder), neither with a VaeEncoder. Each
image is compared with diffusers' own pipeline on the same tiny weights, through gRPC (Generate,
GenerateStream, a job), the OpenAI-compatible HTTP API and the CLI."""

from __future__ import annotations

import base64
import io

import grpc
import numpy as np
import openai
import pytest
import torch
from helpers import API_KEYS, sdserve_cli
from PIL import Image

from sdserve.v1 import diffusion_pb2

pytestmark = pytest.mark.integration

PROMPT = "a red circle"
# Per model: the request's fields, and diffusers' inputs for the same.
REQUESTS = {
    "sd3": (dict(negative_prompt="blurry", guidance_scale=5.0),
            dict(negative_prompt="blurry", guidance_scale=5.0)),
    "flux": (dict(negative_prompt="blurry", guidance_scale=3.0, true_cfg_scale=2.5),
             dict(negative_prompt="blurry", guidance_scale=3.0, true_cfg_scale=2.5)),
}  # fmt: skip


def _request(model: str, **fields) -> diffusion_pb2.GenerateRequest:
    return diffusion_pb2.GenerateRequest(prompt=PROMPT, model=model, steps=4, seed=3, width=64,
                                         height=48, max_sequence_length=32,
                                         **{**REQUESTS[model][0], **fields})  # fmt: skip


def _pixels(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"), dtype=np.int16)


@pytest.fixture(scope="module")
def diffusers_images(tiny_sd3_model, tiny_flux_model) -> dict[str, np.ndarray]:
    """What diffusers' StableDiffusion3Pipeline / FluxPipeline make for `_request(model)`."""
    from diffusers import FluxPipeline, StableDiffusion3Pipeline

    images = {}
    for model, cls, folder in (("sd3", StableDiffusion3Pipeline, tiny_sd3_model),
                               ("flux", FluxPipeline, tiny_flux_model)):  # fmt: skip
        pipe = cls.from_pretrained(folder, dtype=torch.float32)
        pipe.set_progress_bar_config(disable=True)
        out = pipe(PROMPT, width=64, height=48, num_inference_steps=4, max_sequence_length=32,
                   generator=torch.Generator("cpu").manual_seed(3), output_type="np",
                   **REQUESTS[model][1]).images[0]  # fmt: skip
        images[model] = (out * 255).round().astype(np.int16)
    return images


@pytest.mark.parametrize("model", ["sd3", "flux"])
def test_generate_stream_and_a_job_equal_diffusers(stub, diffusers_images, model):
    expected = diffusers_images[model]
    request = _request(model)
    reply = stub.Generate(request, timeout=120)
    assert np.abs(_pixels(reply.images[0].png) - expected).max() <= 2
    p = reply.parameters
    assert (p.model, p.scheduler, p.max_sequence_length, p.steps) == (model, "flow_euler", 32, 4)
    *_, last = stub.GenerateStream(request, timeout=120)
    assert np.abs(_pixels(last.result.images[0].png) - expected).max() <= 2
    job = stub.SubmitJob(diffusion_pb2.SubmitJobRequest(request=request), timeout=30)
    *_, done = stub.WatchJob(diffusion_pb2.GetJobRequest(job_id=job.job_id), timeout=120)
    assert done.state == diffusion_pb2.JOB_STATE_SUCCEEDED, done.error
    assert np.abs(_pixels(done.result.images[0].png) - expected).max() <= 2


def test_the_http_api_and_the_cli(server, stub, diffusers_images, tmp_path):
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{server.config.server.http_port}/v1",
                           api_key=API_KEYS["tenant-a"], max_retries=0)  # fmt: skip
    extra = {"model": "flux", "seed": 3, "num_inference_steps": 4, "max_sequence_length": 32,
             **REQUESTS["flux"][0]}  # fmt: skip
    reply = client.images.generate(prompt=PROMPT, size="64x48", extra_body=extra)
    image = _pixels(base64.b64decode(reply.data[0].b64_json))
    assert np.abs(image - diffusers_images["flux"]).max() <= 2
    with pytest.raises(openai.BadRequestError, match="max_sequence_length"):
        client.images.generate(prompt=PROMPT, size="64x48",
                               extra_body={**extra, "max_sequence_length": 600})  # fmt: skip

    out = tmp_path / "sd3.png"
    run = sdserve_cli("generate", PROMPT, "--model", "sd3", "--negative-prompt", "blurry",
                      "--guidance", "5", "--steps", "4", "--seed", "3", "--width", "64",
                      "--height", "48", "--max-sequence-length", "32",
                      "--server", server.target, "-o", str(out), "-q")  # fmt: skip
    assert run.returncode == 0, run.stderr
    assert np.abs(_pixels(out.read_bytes()) - diffusers_images["sd3"]).max() <= 2
    assert "Max sequence length: 32" in Image.open(out).text["parameters"]


@pytest.mark.parametrize(
    ("model", "fields", "field"),
    [
        ("flux", dict(init_image=b"\x89PNG"), "init_image"),
        ("flux", dict(loras=[diffusion_pb2.LoraWeight(name="ink")]), "loras"),
        ("sd3", dict(cache_interval=3), "cache_interval"),
        ("sd3", dict(true_cfg_scale=2.0), "true_cfg_scale"),
        ("sd3", dict(scheduler="ddim"), "scheduler"),
        ("default", dict(max_sequence_length=64), "max_sequence_length"),
    ],
)
def test_what_a_family_does_not_take_is_invalid_argument_naming_it(stub, model, fields, field):
    if model == "default":
        request = diffusion_pb2.GenerateRequest(prompt=PROMPT, steps=2, **fields)
    else:
        request = _request(model, **fields)
    if "init_image" in fields:  # a real image: the refusal is the family's, not the PNG's
        png = io.BytesIO()
        Image.new("RGB", (64, 48)).save(png, format="PNG")
        request.init_image = png.getvalue()
    with pytest.raises(grpc.RpcError) as err:
        stub.Generate(request, timeout=60)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value.details()
    assert err.value.details().startswith(field), err.value.details()


def test_sd3s_t5_is_a_deployment_of_its_own_and_neither_has_a_vae_encoder(stub):
    """The sd3 model's TextEncoder loaded no T5 (asked for it, it answers
    FAILED_PRECONDITION), so its Generate above was encoded by TextEncoderT5-sd3."""
    from ray import serve

    (app,) = serve.status().applications.values()
    status = {name: d.status for name, d in app.deployments.items()}
    assert status["TextEncoderT5-sd3"] == "HEALTHY"
    assert "TextEncoderT5-flux" not in status and "TextEncoderT5" not in status
    assert "VaeEncoder-sd3" not in status and "VaeEncoder-flux" not in status
    reply = stub.ListModels(diffusion_pb2.ListModelsRequest(), timeout=30)
    stages = {m.name: [s.stage for s in m.stages] for m in reply.models}
    assert stages["sd3"] == ["text_encoder", "text_encoder_t5", "denoiser", "vae_decoder"]
    assert stages["flux"] == ["text_encoder", "denoiser", "vae_decoder"]
    families = {m.name: (m.family, m.prediction_type, m.image_inputs) for m in reply.models}
    assert families["sd3"] == ("sd3", "flow", False) and families["flux"][0] == "flux"
