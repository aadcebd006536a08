"""The safety checker stage served (issue 31): a flagged image is marked (the shared server's
"default" model, `safety: flag`) or blocked (its "sdxl", `safety: block`), through gRPC and the
HTTP API. The session's checker is tuned on each model's own images of
`helpers.SAFETY_REQUEST`: it flags the first (seed 40) and passes the second (seed 41)."""

from __future__ import annotations

import base64
import io

import httpx
import numpy as np
import pytest
from helpers import API_KEYS, SAFETY_REQUEST
from PIL import Image

from sdserve.v1 import diffusion_pb2

pytestmark = pytest.mark.integration


def _generate(stub, model: str) -> diffusion_pb2.GenerateResponse:
    request = diffusion_pb2.GenerateRequest(**SAFETY_REQUEST, model=model)
    return stub.Generate(request, timeout=120)


def _http(server, model: str) -> dict:
    request = SAFETY_REQUEST
    body = {"prompt": request["prompt"], "model": model, "n": 2, "size": "64x64",
            "seed": request["seed"], "num_inference_steps": request["steps"]}  # fmt: skip
    reply = httpx.post(f"http://127.0.0.1:{server.config.server.http_port}/v1/images/generations",
                       json=body, headers={"Authorization": f"Bearer {API_KEYS['tenant-a']}"},
                       timeout=120)  # fmt: skip
    assert reply.status_code == 200, reply.text
    return reply.json()


def _same_over_http(server, model: str, reply: diffusion_pb2.GenerateResponse) -> None:
    """The HTTP API gives the same request the same images, marked the same way."""
    data = _http(server, model)["data"]
    assert [(d["nsfw_content_detected"], d["blocked"]) for d in data] == [
        (i.nsfw, i.blocked) for i in reply.images
    ]
    assert [base64.b64decode(d["b64_json"]) for d in data] == [i.png for i in reply.images]


def _image(png: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(png))
    image.load()
    return image


def test_flag_marks_the_flagged_image_and_keeps_its_pixels(stub, server):
    reply = _generate(stub, "default")
    assert [(i.nsfw, i.blocked) for i in reply.images] == [(True, False), (False, False)]
    images = [_image(i.png) for i in reply.images]
    assert [im.text["safety"] for im in images] == ["flagged", "passed"]
    assert all("Seed: 4" in im.text["parameters"] for im in images)
    assert np.asarray(images[0]).std() > 0  # not blacked out
    assert reply.timings.safety_checker_s > 0

    _same_over_http(server, "default", reply)


def test_block_replaces_the_flagged_image_by_black(stub, server):
    reply = _generate(stub, "sdxl")
    assert [(i.nsfw, i.blocked) for i in reply.images] == [(True, True), (False, False)]
    blocked, passed = (_image(i.png) for i in reply.images)
    assert not np.asarray(blocked.convert("RGB")).any() and blocked.size == (64, 64)
    assert np.asarray(passed).std() > 0
    assert blocked.text["safety"] == "blocked" and passed.text["safety"] == "passed"
    assert "Model: sdxl" in blocked.text["parameters"]

    _same_over_http(server, "sdxl", reply)


def test_a_model_without_a_checker_says_nothing(stub, server):
    """safety: off (the built-in model): no verdicts, no text, no HTTP fields."""
    reply = _generate(stub, "shapes")
    assert not any(i.nsfw or i.blocked for i in reply.images)
    assert "safety" not in _image(reply.images[0].png).text
    assert reply.timings.safety_checker_s == 0
    assert "nsfw_content_detected" not in _http(server, "shapes")["data"][0]


def test_the_cli_says_which_image_was_blocked(server, tmp_path):
    from helpers import sdserve_cli

    out = tmp_path / "x.png"
    run = sdserve_cli("generate", SAFETY_REQUEST["prompt"], "--model", "sdxl", "--steps",
                      str(SAFETY_REQUEST["steps"]), "--seed", str(SAFETY_REQUEST["seed"]),
                      "--num-images", "2", "--width", "64", "--height", "64", "--server",
                      server.target, "--output", str(out))  # fmt: skip
    assert run.returncode == 0, run.stderr
    lines = [line for line in run.stdout.splitlines() if line.startswith("wrote")]
    assert "blocked by the safety checker" in lines[0] and "safety" not in lines[1]
