"""Generate through the real stack: gRPC -> Serve proxy -> Pipeline -> three stage deployments."""

from __future__ import annotations

import io
import uuid

import grpc
import numpy as np
import pytest
from helpers import diffusers_image, sdserve_cli
from PIL import Image

from sdserve.v1 import diffusion_pb2

pytestmark = pytest.mark.integration


def _pixels(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).astype(int)


@pytest.mark.parametrize("scheduler", ["ddpm", "ddim", "euler", "dpmpp_2m"])
def test_cli_image_equals_diffusers(server, tiny_model, diffusers_pipe, tmp_path, scheduler):
    inputs = dict(
        prompt="a red circle on a blue background",
        negative_prompt="blurry",
        steps=15,
        guidance=6.0,
        width=64,
        height=48,
        seed=1234,
    )
    out = tmp_path / "out.png"
    run = sdserve_cli(
        "generate",
        inputs["prompt"],
        "--server",
        server.target,
        "-o",
        str(out),
        "--negative-prompt",
        inputs["negative_prompt"],
        "--steps",
        str(inputs["steps"]),
        "--guidance",
        str(inputs["guidance"]),
        "--width",
        "64",
        "--height",
        "48",
        "--seed",
        str(inputs["seed"]),
        "--scheduler",
        scheduler,
    )
    assert run.returncode == 0, run.stderr
    assert str(out) in run.stdout
    png = out.read_bytes()
    ours = _pixels(png)
    theirs = diffusers_image(diffusers_pipe, tiny_model, scheduler, **inputs).astype(int)
    assert ours.shape == theirs.shape == (48, 64, 3)
    assert np.abs(ours - theirs).max() <= 2
    parameters = Image.open(io.BytesIO(png)).text["parameters"]
    assert parameters.startswith("a red circle on a blue background\nNegative prompt: blurry\n")
    assert f"Steps: 15, Sampler: {scheduler}, CFG scale: 6, Seed: 1234, Size: 64x48" in parameters


def test_same_request_same_pixels_other_seed_other_pixels(stub):
    request = diffusion_pb2.GenerateRequest(
        prompt="a cat", steps=8, seed=42, scheduler="euler_ancestral"
    )
    first = stub.Generate(request, timeout=60)
    second = stub.Generate(request, timeout=60)
    assert np.array_equal(_pixels(first.images[0].png), _pixels(second.images[0].png))
    request.seed = 43
    third = stub.Generate(request, timeout=60)
    assert np.abs(_pixels(first.images[0].png) - _pixels(third.images[0].png)).max() > 2


def test_server_picks_and_returns_a_seed(stub):
    reply = stub.Generate(diffusion_pb2.GenerateRequest(prompt="a dog", steps=4), timeout=60)
    (image,) = reply.images
    again = stub.Generate(
        diffusion_pb2.GenerateRequest(prompt="a dog", steps=4, seed=image.seed), timeout=60
    )
    assert np.array_equal(_pixels(image.png), _pixels(again.images[0].png))


def test_defaults_and_response_fields(server, stub):
    reply = stub.Generate(diffusion_pb2.GenerateRequest(prompt="a tree", seed=3), timeout=60)
    defaults = server.config.defaults
    assert reply.parameters.steps == defaults.steps
    assert reply.parameters.scheduler == defaults.scheduler
    assert reply.parameters.guidance_scale == pytest.approx(defaults.guidance_scale)
    assert (reply.parameters.width, reply.parameters.height) == (64, 64)  # the model's native size
    assert _pixels(reply.images[0].png).shape == (64, 64, 3)
    t = reply.timings
    assert min(t.text_encoder_s, t.denoiser_s, t.vae_decoder_s) > 0
    assert t.total_s >= t.text_encoder_s + t.denoiser_s + t.vae_decoder_s
    assert t.vae_encoder_s == 0  # text-to-image: no VaeEncoder call
    # Serve's request id (a UUID, what its log lines carry), one per call
    again = stub.Generate(diffusion_pb2.GenerateRequest(prompt="a tree", seed=3, steps=2),
                          timeout=60)  # fmt: skip
    assert uuid.UUID(reply.request_id) != uuid.UUID(again.request_id)


def test_num_images_have_consecutive_seeds_and_match_single_requests(stub):
    request = diffusion_pb2.GenerateRequest(
        prompt="a boat", steps=6, seed=10, num_images=3, scheduler="ddpm", width=32, height=32
    )
    reply = stub.Generate(request, timeout=60)
    assert [im.seed for im in reply.images] == [10, 11, 12]
    single = stub.Generate(
        diffusion_pb2.GenerateRequest(
            prompt="a boat", steps=6, seed=11, scheduler="ddpm", width=32, height=32
        ),
        timeout=60,
    )
    assert np.abs(_pixels(reply.images[1].png) - _pixels(single.images[0].png)).max() <= 2


BAD_INPUTS = [
    ("prompt", {"prompt": ""}),
    ("prompt", {"prompt": "x" * 1001}),
    ("negative_prompt", {"negative_prompt": "x" * 1001}),
    ("width", {"width": 60}),
    ("height", {"height": 4100}),
    ("width", {"width": 0}),
    ("width", {"width": 2048, "height": 2048}),
    ("steps", {"steps": 0}),
    ("steps", {"steps": 151}),
    ("guidance_scale", {"guidance_scale": float("nan")}),
    ("guidance_scale", {"guidance_scale": float("inf")}),
    ("guidance_scale", {"guidance_scale": -2.0}),
    ("scheduler", {"scheduler": "not_a_sampler"}),
    ("num_images", {"num_images": 0}),
    ("num_images", {"num_images": 9}),
]


def test_bad_input_is_invalid_argument_and_server_keeps_serving(stub):
    for field, fields in BAD_INPUTS:
        request = diffusion_pb2.GenerateRequest(**{"prompt": "a cat", "steps": 2, **fields})
        with pytest.raises(grpc.RpcError) as err:
            stub.Generate(request, timeout=60)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (field, err.value.details())
        assert err.value.details().startswith(f"{field}: "), err.value.details()
    reply = stub.Generate(diffusion_pb2.GenerateRequest(prompt="a cat", steps=2), timeout=60)
    assert len(reply.images) == 1


def test_cli_prints_the_grpc_error_and_exits_2(server, tmp_path):
    run = sdserve_cli(
        "generate",
        "a cat",
        "--server",
        server.target,
        "--steps",
        "0",
        "-o",
        str(tmp_path / "x.png"),
    )
    assert run.returncode == 2
    assert run.stderr.strip().startswith("INVALID_ARGUMENT: steps: ")
    assert not (tmp_path / "x.png").exists()


def test_cli_unreachable_server_is_unavailable(tmp_path):
    from helpers import free_port

    run = sdserve_cli("generate", "a cat", "--server", f"127.0.0.1:{free_port()}", "--timeout", "5")
    assert run.returncode == 2
    assert run.stderr.split(":")[0] in ("UNAVAILABLE", "DEADLINE_EXCEEDED")


def test_cli_cheaper_steps_reach_the_denoiser(server, tmp_path):
    """--guidance-stop and --cache-interval travel through the proxy to the engine: the
    Denoiser's row counters change by exactly what the request's knobs predict."""
    from helpers import denoiser_stats

    app = server.config.server.app_name
    before = denoiser_stats(app)
    run = sdserve_cli("generate", "a cat", "--server", server.target, "-o",
                      str(tmp_path / "c.png"), "--steps", "10", "--guidance", "5", "--seed", "1",
                      "--guidance-stop", "0.4", "--cache-interval", "3")  # fmt: skip
    assert run.returncode == 0, run.stderr
    after = denoiser_stats(app)
    # guided on steps 0..4 (5 + 10 rows); shallow on steps 1, 2, 4, 5, 7, 8 (2 + 2 + 2 + 1 x 3)
    assert after.unet_rows - before.unet_rows == 15
    assert after.shallow_rows - before.shallow_rows == 9
    parameters = Image.open(tmp_path / "c.png").text["parameters"]
    assert "Guidance stop: 0.4, DeepCache interval: 3" in parameters
