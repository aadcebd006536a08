"""The SafetyChecker stage equals diffusers' `StableDiffusionPipeline` with its
`safety_checker` and `feature_extractor`: the same `nsfw_content_detected` for a batch of the
tiny model's images, the pixels kept in flag mode and blackened exactly where flagged in block
mode; through the stage service and through the request path (in process)."""

from __future__ import annotations

import asyncio
import io
import threading

import numpy as np
import pytest
import torch
from PIL import Image

from sdserve.api.types import GenerateParams, Preview
from sdserve.config import SdserveConfig
from sdserve.metrics import StatsLogger
from sdserve.orchestration.in_process import InProcessStageClient
from sdserve.orchestration.path import StagePath
from sdserve.pipeline.vae import to_png
from sdserve.stages.messages import CheckImages
from sdserve.stages.runtime import model_stages
from sdserve.stages.safety import SafetyCheckerService, add_text
from sdserve.stats import ImagesChecked
from sdserve.testing.safety_checkers import tune_safety_checker
from sdserve.testing.tiny import make_tiny_model

PROMPT, SEED, STEPS, GUIDANCE = "a red square", 3, 4, 7.5
N = 4
FLAGGED = [True, False, True, False]
"""The checker is tuned on the tiny model's own images of seeds SEED..SEED+3: it flags the
first and third."""


def _pipe(model, **parts):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(model, local_files_only=True,
                                                   dtype=torch.float32, **parts)  # fmt: skip
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _generate(pipe):
    """diffusers' images of seeds SEED..SEED+N-1 (a generator each, as sdserve seeds them):
    (uint8 (N, 64, 64, 3), nsfw_content_detected)."""
    generators = [torch.Generator("cpu").manual_seed(SEED + i) for i in range(N)]
    # On one thread, as the stages run (`_config`): a float32 sum's order depends on the thread
    # count, and an earlier test of the session may have left torch on two (one pixel of 49152
    # was off by one in the whole suite).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        out = pipe(PROMPT, num_inference_steps=STEPS, guidance_scale=GUIDANCE,
                   num_images_per_prompt=N, output_type="np", generator=generators)  # fmt: skip
    finally:
        torch.set_num_threads(threads)
    return (out.images * 255).round().astype(np.uint8), out.nsfw_content_detected


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("models") / "safe", safety_checker=True)


@pytest.fixture(scope="module")
def diffusers_out(model):
    """(the unchecked images, the checked pipeline's images, its nsfw_content_detected), the
    checker tuned first on the unchecked images."""
    unchecked, _ = _generate(_pipe(model, safety_checker=None, requires_safety_checker=False))
    flagged = [im for im, f in zip(unchecked, FLAGGED, strict=True) if f]
    passed = [im for im, f in zip(unchecked, FLAGGED, strict=True) if not f]
    tune_safety_checker(model, flagged, passed)
    checked, nsfw = _generate(_pipe(model))
    assert nsfw == FLAGGED
    return unchecked, checked, nsfw


def _config(model, mode: str) -> SdserveConfig:
    one = {"torch_threads": 1}
    return SdserveConfig(
        model={"path": str(model), "safety": mode, "dtype": "float32"},
        engine={"compile": "off"},
        stages={
            s: one
            for s in ("text_encoder", "denoiser", "vae_decoder", "vae_encoder", "safety_checker")
        },  # fmt: skip
    )


def _pixels(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))


def _texts(png: bytes) -> dict:
    return Image.open(io.BytesIO(png)).text


@pytest.mark.parametrize("mode", ["flag", "block"])
def test_the_stage_equals_the_pipelines_safety_checker(model, diffusers_out, mode):
    unchecked, checked_by_diffusers, nsfw = diffusers_out
    stats = StatsLogger()
    recorded = []
    stats._handlers[ImagesChecked] = recorded.append
    service = SafetyCheckerService.from_config(_config(model, mode), stats)
    try:
        pngs = tuple(to_png(im, f"seed {SEED + i}") for i, im in enumerate(unchecked))
        out = asyncio.run(service.check(CheckImages("r1", pngs)))
    finally:
        service.torch.close()
    assert list(out.nsfw) == nsfw == FLAGGED
    expected = checked_by_diffusers if mode == "block" else unchecked
    np.testing.assert_array_equal(np.stack([_pixels(p) for p in out.pngs]), expected)
    assert list(out.blocked) == (FLAGGED if mode == "block" else [False] * N)
    verdict = "blocked" if mode == "block" else "flagged"
    for i, png in enumerate(out.pngs):
        texts = _texts(png)
        assert texts["parameters"] == f"seed {SEED + i}"
        assert texts["safety"] == (verdict if FLAGGED[i] else "passed")
        if not FLAGGED[i] or mode == "flag":  # the bytes kept, the chunk spliced in
            assert png.startswith(pngs[i][:-12]) and png.endswith(pngs[i][-12:])
    blocked = 2 if mode == "block" else 0
    assert recorded == [ImagesChecked("default", 2, 2 - blocked, blocked)]


def test_two_concurrent_calls_share_one_forward(model, diffusers_out):
    unchecked, _, _ = diffusers_out
    service = SafetyCheckerService.from_config(_config(model, "flag"), StatsLogger())
    pngs = [to_png(im) for im in unchecked]

    async def both():
        release = threading.Event()
        service.torch.submit(release.wait)  # the torch thread busy: the calls pile up
        calls = [asyncio.ensure_future(service.check(CheckImages(f"r{i}", tuple(pngs[i::2]))))
                 for i in range(2)]  # fmt: skip
        await asyncio.sleep(0.05)
        release.set()
        return await asyncio.gather(*calls)

    try:
        first, second = asyncio.run(both())
    finally:
        service.torch.close()
    assert service._calls.batches == 1 and service._calls.calls == 2
    assert list(first.nsfw) == FLAGGED[0::2] and list(second.nsfw) == FLAGGED[1::2]


def test_the_request_path_blocks_as_the_pipeline_does(model, diffusers_out):
    """Generate's images through the in-process stages (text encoder, denoiser, VAE decoder,
    safety checker) equal the checked pipeline's, and say which were flagged and blocked."""
    _, checked_by_diffusers, nsfw = diffusers_out
    config = _config(model, "block")
    assert model_stages(config, config.model)[-1] == "safety_checker"
    client = InProcessStageClient.from_config(config)
    try:
        path = StagePath(client, config)
        params = GenerateParams(prompt=PROMPT, negative_prompt="", steps=STEPS,
                                guidance_scale=GUIDANCE, seed=SEED, num_images=N, width=64,
                                height=64, scheduler="pndm", model="default")  # fmt: skip
        result = asyncio.run(_last(path.run(params)))
        infos = asyncio.run(client.stage_infos())
        streamed = asyncio.run(_all(path.run(params, stream=True, preview_every=1)))
    finally:
        client.close()
    assert list(result.nsfw) == nsfw and list(result.blocked) == nsfw
    np.testing.assert_array_equal(np.stack([_pixels(p) for p in result.pngs]),
                                  checked_by_diffusers)  # fmt: skip
    assert "Seed: " in _texts(result.pngs[0])["parameters"]
    assert result.timings.safety_checker_s > 0
    assert infos[-1].stage == "safety_checker"
    # a stream sends no previews of a model that blocks: they show the image unchecked
    assert not [e for e in streamed if isinstance(e, Preview)] and len(streamed) > STEPS
    assert streamed[-1].pngs == result.pngs


async def _all(events):
    return [event async for event in events]


async def _last(events):
    last = None
    async for event in events:
        last = event
    return last


def test_add_text_keeps_the_image():
    png = to_png(np.full((8, 8, 3), 7, np.uint8), "p")
    marked = add_text(png, "safety", "passed")
    assert _texts(marked) == {"parameters": "p", "safety": "passed"}
    np.testing.assert_array_equal(_pixels(marked), _pixels(png))
    with pytest.raises(ValueError, match="IEND"):
        add_text(b"not a png", "k", "v")


def test_safety_needs_a_checker_naming_the_field(tmp_path, model):
    bare = make_tiny_model(tmp_path / "bare")
    with pytest.raises(ValueError, match="safety: a safety checker needs"):
        SdserveConfig(model={"path": str(bare), "safety": "flag"})
    with pytest.raises(ValueError, match="safety_checker_dir: a safety checker needs"):
        SdserveConfig(model={"path": str(bare), "safety": "block",
                             "safety_checker_dir": str(tmp_path / "none")})  # fmt: skip
    # the checker of another folder: laid out as a model folder's, or at its root
    SdserveConfig(model={"path": str(bare), "safety": "flag", "safety_checker_dir": str(model)})
    SdserveConfig(model={"path": str(bare), "safety": "off"})
    off = SdserveConfig(model={"path": str(bare)})
    assert model_stages(off, off.model)[-1] == "vae_encoder"
    assert SdserveConfig(model={"safety": False}).model.safety == "off"  # YAML's bare `off`


def test_the_counter_and_the_http_fields():
    from sdserve.http.openai_images import images_response
    from sdserve.metrics import Metrics

    incs = []

    class Fake:
        def __init__(self, spec):
            self.name = spec.name

        def inc(self, value=1, tags=None):
            incs.append((self.name, value, tags))

        observe = set = inc

    StatsLogger(Metrics(Fake)).record(ImagesChecked("sd15", passed=3, flagged=0, blocked=2))
    name = "sdserve_safety_images"
    assert incs == [(name, 3, {"model": "sd15", "outcome": "passed"}),
                    (name, 2, {"model": "sd15", "outcome": "blocked"})]  # fmt: skip
    body = images_response([b"a", b"b"], "p", nsfw=(True, False), blocked=(True, False))
    assert [(d["nsfw_content_detected"], d["blocked"]) for d in body["data"]] == [
        (True, True), (False, False)
    ]  # fmt: skip
    assert "nsfw_content_detected" not in images_response([b"a"], "p")["data"][0]
