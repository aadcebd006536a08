"""LoRA adapters per request through the running server (issue 17): the tiny model's `loras/`
folder holds "ink" (diffusers format, text-encoder weights too), "grain" (kohya-style) and
"broken" (not a LoRA); requests with different adapters share the Denoiser's forwards."""

from __future__ import annotations

import base64
import io

import grpc
import numpy as np
import openai
import pytest
from helpers import API_KEYS, sdserve_cli
from PIL import Image

from sdserve.v1 import diffusion_pb2

pytestmark = pytest.mark.integration

MIX = [(), (("ink", 0.8),), (("grain", 1.0),), (("ink", 0.5), ("grain", 1.2))]


def _pixels(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"), dtype=np.int16)


def _request(loras, seed: int, steps: int = 6) -> diffusion_pb2.GenerateRequest:
    request = diffusion_pb2.GenerateRequest(prompt="a cat", steps=steps, seed=seed,
                                            scheduler="ddim", width=64, height=64)  # fmt: skip
    for name, scale in loras:
        request.loras.add(name=name, scale=scale)
    return request


def test_mixed_adapters_at_once_each_equal_their_solo_result(stub):
    requests = [_request(loras, seed=i) for i, loras in enumerate(MIX)]
    futures = [stub.Generate.future(r, timeout=120) for r in requests]
    together = [f.result(timeout=120) for f in futures]
    for request, reply, loras in zip(requests, together, MIX, strict=True):
        assert [(w.name, round(w.scale, 6)) for w in reply.parameters.loras] == list(loras)
        solo = stub.Generate(request, timeout=60)
        diff = np.abs(_pixels(reply.images[0].png) - _pixels(solo.images[0].png)).max()
        assert diff <= 2, (loras, diff)
    base = _pixels(together[0].images[0].png)
    assert all(np.abs(_pixels(r.images[0].png) - base).max() > 10 for r in together[1:])


def test_unknown_and_broken_adapters_are_refused_by_name(stub):
    with pytest.raises(grpc.RpcError) as err:
        stub.Generate(_request((("nope", 1.0),), seed=0), timeout=30)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "loras[0].name" in err.value.details() and "'nope'" in err.value.details()
    with pytest.raises(grpc.RpcError) as err:
        stub.Generate(_request((("broken", 1.0),), seed=0), timeout=30)
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "adapter 'broken'" in err.value.details()
    assert stub.Generate(_request((("ink", 1.0),), seed=0), timeout=60).images  # still serving


def test_list_loras_and_the_cli(stub, server, tmp_path):
    reply = stub.ListLoras(diffusion_pb2.ListLorasRequest(), timeout=30)
    assert reply.model == "default"
    assert [f.name for f in reply.loras] == ["broken", "grain", "ink"]
    listed = sdserve_cli("loras", "--server", server.target)
    assert listed.returncode == 0 and "grain" in listed.stdout and "ink" in listed.stdout
    out = tmp_path / "ink.png"
    run = sdserve_cli("generate", "a cat", "--lora", "ink:0.8", "--steps", "3", "--seed", "1",
                      "--server", server.target, "-o", str(out), "-q")  # fmt: skip
    assert run.returncode == 0, run.stderr
    assert "LoRA: ink:0.8" in Image.open(out).text["parameters"]


def test_the_http_api_takes_loras(server, stub):
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{server.config.server.http_port}/v1",
                           api_key=API_KEYS["tenant-a"], max_retries=0)  # fmt: skip
    reply = client.images.generate(
        prompt="a cat", size="64x64",
        extra_body={"seed": 2, "num_inference_steps": 6, "scheduler": "ddim",
                    "loras": [{"name": "grain", "scale": 1.0}]},
    )  # fmt: skip
    png = base64.b64decode(reply.data[0].b64_json)
    assert png == stub.Generate(_request((("grain", 1.0),), seed=2), timeout=60).images[0].png


def test_the_shipped_cyan_adapter_through_the_server(stub, server, tmp_path):
    """The built-in model ("shapes" here) ships loras/cyan: listed, and `sdserve generate --lora
    cyan` draws what the checker calls cyan where the same request without it does not."""
    reply = stub.ListLoras(diffusion_pb2.ListLorasRequest(model="shapes"), timeout=30)
    assert "cyan" in [f.name for f in reply.loras]
    prompt = "a large yellow square on a cyan background"
    for lora, cyan in (("cyan", True), (None, False)):
        out = tmp_path / f"{lora}.png"
        args = ["generate", prompt, "--model", "shapes", "--seed", "20261129", "-o", str(out)]
        run = sdserve_cli(*args, *(["--lora", lora] if lora else []), "-q", "--server",
                          server.target)  # fmt: skip
        assert run.returncode == 0, run.stderr
        checked = sdserve_cli("check-image", str(out), prompt).stdout
        assert ("background color: cyan (as prompted)" in checked) == cyan, checked
