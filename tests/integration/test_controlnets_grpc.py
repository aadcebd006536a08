"""ControlNets per request through the running server (issue 28): the tiny model's
ControlNet folder (its `controlnet_dir`) holds its random "edges" and "depth" nets and
"xl-edges", a tiny SDXL's net (another model family)."""

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


def _png(pixels: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def _square() -> np.ndarray:
    pixels = np.zeros((64, 64, 3), np.uint8)
    pixels[16:48, 16:48] = 255
    return pixels


SQUARE = _png(_square())


def _pixels(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"), dtype=np.int16)


def _request(*controls: dict, seed: int = 5) -> diffusion_pb2.GenerateRequest:
    request = diffusion_pb2.GenerateRequest(prompt="a square", steps=4, seed=seed,
                                            scheduler="ddim", width=64, height=64)  # fmt: skip
    for control in controls:
        request.controls.add(**{"image": SQUARE, **control})
    return request


def _refused(stub, request) -> str:
    with pytest.raises(grpc.RpcError) as err:
        stub.Generate(request, timeout=30)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value.details()
    return err.value.details()


def test_a_control_changes_the_image_the_same_way_on_every_call(stub):
    """Generate with a control differs from the same request without it, and equals it through
    GenerateStream and through a job; two controls differ from one."""
    plain = _pixels(stub.Generate(_request(), timeout=60).images[0].png)
    request = _request({"name": "edges", "scale": 0.8})
    reply = stub.Generate(request, timeout=60)
    edges = _pixels(reply.images[0].png)
    assert np.abs(edges - plain).max() > 10
    assert [(c.name, round(c.scale, 6), c.image) for c in reply.parameters.controls] == [
        ("edges", 0.8, b"")]  # fmt: skip
    *_, last = stub.GenerateStream(request, timeout=60)
    assert np.abs(_pixels(last.result.images[0].png) - edges).max() <= 2
    job = stub.SubmitJob(diffusion_pb2.SubmitJobRequest(request=request), timeout=30)
    *_, done = stub.WatchJob(diffusion_pb2.GetJobRequest(job_id=job.job_id), timeout=120)
    assert done.state == diffusion_pb2.JOB_STATE_SUCCEEDED, done.error
    assert np.abs(_pixels(done.result.images[0].png) - edges).max() <= 2
    two = stub.Generate(_request({"name": "edges", "scale": 0.8},
                                 {"name": "depth", "preprocess": "canny"}), timeout=60)  # fmt: skip
    assert np.abs(_pixels(two.images[0].png) - edges).max() > 10


def test_list_controlnets(stub):
    reply = stub.ListControlNets(diffusion_pb2.ListControlNetsRequest(), timeout=30)
    nets = {n.name: n for n in reply.controlnets}
    assert reply.model == "default" and set(nets) == {"depth", "edges", "xl-edges"}
    assert nets["edges"].file_bytes > 0 and not nets["edges"].misfit
    assert "another model family" in nets["xl-edges"].misfit


@pytest.mark.parametrize(
    ("control", "field", "says"),
    [
        ({"name": "pose"}, "controls[0].name", "it has: depth, edges, xl-edges"),
        ({"name": "xl-edges"}, "controls[0].name", "is for another model family"),
        ({"name": "edges", "image": b"nope"}, "controls[0].image", "cannot be decoded"),
        ({"name": "edges", "scale": 3.0}, "controls[0].scale", "within 0..2"),
        ({"name": "edges", "start": 0.6, "end": 0.5}, "controls[0].end", "(start, 1]"),
        ({"name": "edges", "preprocess": "hed"}, "controls[0].preprocess", "canny"),
    ],
)  # fmt: skip
def test_bad_controls_are_invalid_argument_naming_the_field(stub, control, field, says):
    details = _refused(stub, _request(control))
    assert details.startswith(field) and says in details, details


def test_too_many_controls_are_refused(stub):
    details = _refused(stub, _request(*[{"name": "edges"}] * 5))
    assert details.startswith("controls:") and "at most 4" in details


def test_the_http_api_and_the_cli_take_controls(server, stub, tmp_path):
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{server.config.server.http_port}/v1",
                           api_key=API_KEYS["tenant-a"], max_retries=0)  # fmt: skip
    extra = {"seed": 5, "num_inference_steps": 4, "scheduler": "ddim",
             "controls": [{"name": "edges", "image": base64.b64encode(SQUARE).decode(),
                           "scale": 0.8}]}  # fmt: skip
    reply = client.images.generate(prompt="a square", size="64x64", extra_body=extra)
    expected = stub.Generate(_request({"name": "edges", "scale": 0.8}), timeout=60).images[0].png
    assert np.abs(_pixels(base64.b64decode(reply.data[0].b64_json)) - _pixels(expected)).max() <= 2
    extra["controls"][0]["scale"] = "strong"
    with pytest.raises(openai.BadRequestError, match=r"controls\[0\]\.scale"):
        client.images.generate(prompt="a square", size="64x64", extra_body=extra)

    square, out = tmp_path / "square.png", tmp_path / "out.png"
    square.write_bytes(SQUARE)
    run = sdserve_cli("generate", "a square", "--control", f"edges={square}:0.8", "--steps", "4",
                      "--seed", "5", "--scheduler", "ddim", "--width", "64", "--height", "64",
                      "--server", server.target, "-o", str(out), "-q")  # fmt: skip
    assert run.returncode == 0, run.stderr
    assert np.abs(_pixels(out.read_bytes()) - _pixels(expected)).max() <= 2
    assert "ControlNet: edges:0.8:0:1" in Image.open(out).text["parameters"]
    listed = sdserve_cli("controlnets", "--server", server.target)
    assert listed.returncode == 0 and "edges" in listed.stdout and "NOT USABLE" in listed.stdout
