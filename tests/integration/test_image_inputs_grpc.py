"""Image-to-image and inpainting through the real stack: gRPC -> Serve proxy -> Pipeline ->
TextEncoder + VaeEncoder -> Denoiser -> VaeDecoder, in the session's one app."""

from __future__ import annotations

import io
import json

import grpc
import numpy as np
import pytest
from helpers import diffusers_image, sdserve_cli
from PIL import Image

from sdserve.v1 import diffusion_pb2

pytestmark = pytest.mark.integration


def _png(pixels: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def _pixels(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).astype(int)


y, x = np.mgrid[0:64, 0:64]
INIT = np.stack([x * 4, y * 4, np.full_like(x, 90)], axis=-1).astype(np.uint8)
MASK = np.zeros((64, 64), np.uint8)
MASK[8:40, 16:56] = 255


@pytest.mark.parametrize(("kind", "scheduler"), [("img2img", "euler"), ("inpaint", "ddim")])
def test_cli_image_input_equals_diffusers(server, tiny_model, tmp_path, kind, scheduler):
    from diffusers import StableDiffusionImg2ImgPipeline, StableDiffusionInpaintPipeline

    (tmp_path / "in.png").write_bytes(_png(INIT))
    (tmp_path / "mask.png").write_bytes(_png(MASK))
    args = ["generate", "a red circle", "--server", server.target, "-o", str(tmp_path / "o.png"),
            "--steps", "10", "--guidance", "5", "--seed", "7", "--scheduler", scheduler,
            "--init-image", str(tmp_path / "in.png"), "--strength", "0.7"]  # fmt: skip
    inputs = dict(image=Image.fromarray(INIT), strength=0.7)
    cls = StableDiffusionImg2ImgPipeline
    if kind == "inpaint":
        args += ["--mask", str(tmp_path / "mask.png")]
        inputs["mask_image"] = Image.fromarray(MASK, "L")
        cls = StableDiffusionInpaintPipeline
    run = sdserve_cli(*args)
    assert run.returncode == 0, run.stderr
    pipe = cls.from_pretrained(tiny_model, local_files_only=True, safety_checker=None,
                               requires_safety_checker=False)  # fmt: skip
    pipe.set_progress_bar_config(disable=True)
    theirs = diffusers_image(pipe, tiny_model, scheduler, prompt="a red circle", steps=10,
                             guidance=5.0, seed=7, **inputs)  # fmt: skip
    ours = _pixels((tmp_path / "o.png").read_bytes())
    assert np.abs(ours - theirs.astype(int)).max() <= 2


def test_generate_reports_the_vae_encoder_and_the_strength(stub):
    text_only = stub.Generate(diffusion_pb2.GenerateRequest(prompt="x", steps=4, seed=1),
                              timeout=60)  # fmt: skip
    assert text_only.timings.vae_encoder_s == 0  # no image: the VaeEncoder is not called
    request = diffusion_pb2.GenerateRequest(prompt="x", steps=4, seed=1, init_image=_png(INIT))
    reply = stub.Generate(request, timeout=60)
    assert reply.timings.vae_encoder_s > 0
    assert reply.parameters.strength == pytest.approx(0.8)  # the default
    assert (reply.images[0].width, reply.images[0].height) == (64, 64)  # the image's size


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        (dict(init_image=b"\x89PNG\r\n\x1a\n broken"), "init_image"),
        (dict(mask_image=_png(MASK)), "mask_image"),
        (dict(init_image=_png(INIT), mask_image=_png(MASK[:32])), "mask_image"),
        (dict(init_image=_png(INIT), strength=1.5), "strength"),
    ],
)
def test_bad_image_inputs_get_invalid_argument_and_the_server_goes_on(stub, fields, field):
    for call in (stub.Generate, stub.SubmitJob):
        request = diffusion_pb2.GenerateRequest(prompt="x", steps=2, **fields)
        if call is stub.SubmitJob:
            request = diffusion_pb2.SubmitJobRequest(request=request)
        with pytest.raises(grpc.RpcError) as error:
            call(request, timeout=30)
        assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        # SubmitJob names the field inside its request: request.init_image
        assert error.value.details().removeprefix("request.").startswith(f"{field}:")
    ok = stub.Generate(diffusion_pb2.GenerateRequest(prompt="x", steps=2, seed=0), timeout=60)
    assert len(ok.images) == 1


def test_an_inpainting_job_makes_the_same_images_as_generate(stub):
    fields = dict(prompt="a job", steps=6, seed=3, scheduler="euler_ancestral",
                  init_image=_png(INIT), mask_image=_png(MASK), strength=0.9)  # fmt: skip
    job = stub.SubmitJob(
        diffusion_pb2.SubmitJobRequest(request=diffusion_pb2.GenerateRequest(**fields)),
        timeout=30,
    )
    *_, last = stub.WatchJob(diffusion_pb2.GetJobRequest(job_id=job.job_id), timeout=120)
    assert last.state == diffusion_pb2.JOB_STATE_SUCCEEDED, last.error
    direct = stub.Generate(diffusion_pb2.GenerateRequest(**fields), timeout=60)
    assert [i.png for i in last.result.images] == [i.png for i in direct.images]


def test_loadtest_mixes_text_and_image_requests(server, tmp_path):
    (tmp_path / "in.png").write_bytes(_png(INIT))
    out = tmp_path / "report.json"
    run = sdserve_cli("loadtest", "--server", server.target, "--concurrency", "4",
                      "--requests", "8", "--steps", "4", "--width", "32",
                      "--init-image", str(tmp_path / "in.png"), "--strength", "0.5,1",
                      "--image-every", "2", "--out", str(out), "-q")  # fmt: skip
    assert run.returncode == 0, run.stderr
    summary = json.loads(out.read_text())["summary"]
    assert summary["ok"] == 8 and summary["errors"] == {}
    assert {k: v["ok"] for k, v in summary["by_kind"].items()} == {"image": 4, "text": 4}
    assert "by kind" in run.stdout


def test_make_tiny_inpaint_model(tmp_path):
    run = sdserve_cli("make-tiny-model", str(tmp_path / "m"), "--arch", "tiny-inpaint")
    assert run.returncode == 0, run.stderr
    unet = json.loads((tmp_path / "m" / "unet" / "config.json").read_text())
    assert unet["in_channels"] == 9 and unet["out_channels"] == 4
