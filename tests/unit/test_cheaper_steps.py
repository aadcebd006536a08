"""Cheaper steps inside the step batch: guidance truncation (`guidance_stop`) and DeepCache
(`cache_interval`), each equal to its reference, and exact rows unchanged beside them.

They run on the built-in default model: its weights are trained, so guidance and deep features
matter (on the random tiny model, dropping guidance moves no pixel by more than 1/255)."""

from __future__ import annotations

import asyncio
import io
import json

import numpy as np
import pytest
import torch
from helpers import diffusers_image
from PIL import Image

from sdserve.api.proto import result_to_pb
from sdserve.api.types import GenerateFields, Result
from sdserve.errors import InvalidArgument
from sdserve.pipeline import deepcache


def _pixels(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).astype(int)


async def _generate(path, **fields) -> Result:
    params = await path.validate(GenerateFields(**fields))
    return [event async for event in path.run(params)][-1]


def _stats(path):
    return path.client.denoiser.stats_message()


@pytest.fixture(scope="module")
def model():
    from sdserve.constants import DEFAULT_MODEL_DIR

    return DEFAULT_MODEL_DIR


def _in_process_path(deepcache_levels: int = 0):
    from sdserve.config import SdserveConfig
    from sdserve.orchestration.in_process import InProcessStageClient
    from sdserve.orchestration.path import StagePath

    # float32 and eager, as the peers it is compared with
    engine = {"deepcache_levels": deepcache_levels, "compile": "off"}
    config = SdserveConfig.model_validate({"model": {"dtype": "float32"}, "engine": engine})
    client = InProcessStageClient.from_config(config)
    return StagePath(client, config)


@pytest.fixture(scope="module")
def path(model):
    """The request path on the default model, in-process."""
    path = _in_process_path()
    yield path
    path.client.close()


@pytest.fixture(scope="module")
def path_two_levels(model):
    """The same with DeepCache's shallow branch two levels deep (engine.deepcache_levels)."""
    path = _in_process_path(deepcache_levels=2)
    yield path
    path.client.close()


@pytest.fixture(scope="module")
def pipe(model):
    from diffusers import StableDiffusionPipeline

    # fp16 on disk; the CPU path computes in fp32, as sdserve's stages do
    pipe = StableDiffusionPipeline.from_pretrained(model, local_files_only=True,
                                                   dtype=torch.float32)  # fmt: skip
    pipe.set_progress_bar_config(disable=True)
    return pipe


BASE = dict(prompt="a red circle on a blue background", negative_prompt="", steps=10,
            guidance_scale=7.5, width=64, height=64, seed=4)  # fmt: skip


def _theirs(pipe, model, scheduler, **call):
    return diffusers_image(pipe, model, scheduler, prompt=BASE["prompt"],
                           negative_prompt=BASE["negative_prompt"], steps=BASE["steps"],
                           guidance=BASE["guidance_scale"], width=64, height=64,
                           seed=BASE["seed"], **call).astype(int)  # fmt: skip


@pytest.mark.parametrize("scheduler", ["ddim", "dpmpp_2m"])
def test_guidance_stop_equals_diffusers_dynamic_cfg_callback(path, model, pipe, scheduler):
    """diffusers' documented dynamic classifier-free guidance callback (Pipeline callbacks):
    at the end of step int(num_timesteps * 0.4), drop the unconditional half."""

    def dynamic_cfg(pipe, step_index, timestep, callback_kwargs):
        if step_index == int(pipe.num_timesteps * 0.4):
            callback_kwargs["prompt_embeds"] = callback_kwargs["prompt_embeds"].chunk(2)[-1]
            pipe._guidance_scale = 0.0
        return callback_kwargs

    before = _stats(path)
    ours = asyncio.run(_generate(path, **BASE, scheduler=scheduler, guidance_stop=0.4))
    after = _stats(path)
    theirs = _theirs(pipe, model, scheduler, callback_on_step_end=dynamic_cfg,
                     callback_on_step_end_tensor_inputs=["prompt_embeds"])  # fmt: skip
    assert np.abs(_pixels(ours.pngs[0]) - theirs).max() <= 2
    assert after.unet_rows - before.unet_rows == 10 + 5  # guided on steps 0..4
    exact = _theirs(pipe, model, scheduler)
    assert np.abs(_pixels(ours.pngs[0]) - exact).max() > 2  # the knob changed something


@pytest.mark.parametrize(("which", "levels"), [("default", 0), ("default", 1), ("default", 2),
                                               ("tiny", 0), ("tiny", 1)])  # fmt: skip
def test_the_shallow_branch_on_features_of_the_same_step_is_the_full_forward(
    model, tiny_model, which, levels
):
    """Our DeepCache branch, tested on its own: with the deep features cached from this very
    input, the shallow forward must give the full U-Net's output."""
    from diffusers import UNet2DConditionModel

    folder = model if which == "default" else tiny_model
    unet = UNet2DConditionModel.from_pretrained(folder / "unet").float().eval()
    torch.manual_seed(0)
    x = torch.randn(3, 4, unet.config.sample_size, unet.config.sample_size)
    t = torch.tensor([999.0, 500.0, 20.0])
    context = torch.randn(3, 77, unet.config.cross_attention_dim)
    with torch.inference_mode(), deepcache.capture(unet, levels) as captured:
        full = unet(x, t, encoder_hidden_states=context, return_dict=False)[0]
    shallow = deepcache.shallow_forward(unet, x, t, context, captured[0], levels)
    torch.testing.assert_close(shallow, full, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("scheduler", "levels"), [("ddim", 0), ("dpmpp_2m", 0), ("ddim", 2)])
def test_cache_interval_equals_the_deepcache_package(
    path, path_two_levels, model, pipe, scheduler, levels
):
    """DeepCacheSDHelper (the paper's code, `pip install DeepCache`) on diffusers' pipeline,
    uniform, at the same branch (cache_branch_id 0, or 4 for two levels here): the same
    pixels."""
    from DeepCache import DeepCacheSDHelper

    path = path_two_levels if levels else path
    before = _stats(path)
    ours = asyncio.run(_generate(path, **BASE, scheduler=scheduler, cache_interval=3))
    after = _stats(path)
    config = json.loads((model / "scheduler" / "scheduler_config.json").read_text())
    pipe.scheduler = type(pipe.scheduler).from_config(config)  # the helper reads its timesteps
    helper = DeepCacheSDHelper(pipe=pipe)
    branch = deepcache.package_branch_id(pipe.unet, levels)
    assert branch == (4 if levels == 2 else 0)
    helper.set_params(cache_interval=3, cache_branch_id=branch)
    helper.enable()
    try:
        theirs = _theirs(pipe, model, scheduler)
    finally:
        helper.disable()
    assert np.abs(_pixels(ours.pngs[0]) - theirs).max() <= 2
    assert np.abs(_pixels(ours.pngs[0]) - _theirs(pipe, model, scheduler)).max() > 2
    # 10 steps: full at 0, 3, 6, 9; the other 6 shallow, 2 rows each (guided)
    assert after.shallow_rows - before.shallow_rows == 12
    assert after.unet_rows - before.unet_rows == 20


def test_exact_rows_are_unchanged_among_cheaper_ones(path):
    """Requests that use neither knob give their solo pixels in a batch mixed with requests
    that stop guidance early, cache deep features, or both (full and shallow forwards)."""
    exact = [dict(BASE, seed=30 + i, scheduler="euler_ancestral") for i in range(2)]
    cheap = [dict(BASE, seed=40, guidance_stop=0.3), dict(BASE, seed=41, cache_interval=2),
             dict(BASE, seed=42, guidance_stop=0.5, cache_interval=3)]  # fmt: skip
    alone = [asyncio.run(_generate(path, **f)) for f in exact + cheap]

    async def together():
        return await asyncio.gather(*[_generate(path, **f) for f in exact + cheap])

    before = _stats(path)
    results = asyncio.run(together())
    after = _stats(path)
    # the five share the batch's forwards from its first steps (measured: all 10 shared)
    assert after.shared_steps - before.shared_steps >= BASE["steps"] - 2
    assert after.shallow_rows - before.shallow_rows > 0
    for solo, batched in zip(alone, results, strict=True):  # the cheap ones are exact per row too
        assert np.abs(_pixels(solo.pngs[0]) - _pixels(batched.pngs[0])).max() <= 2


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        (dict(guidance_stop=0.0), "guidance_stop"),
        (dict(guidance_stop=1.5), "guidance_stop"),
        (dict(guidance_stop=float("nan")), "guidance_stop"),
        (dict(cache_interval=0), "cache_interval"),
        (dict(cache_interval=11), "cache_interval"),
    ],
)
def test_out_of_range_knobs_name_their_field(path, fields, field):
    with pytest.raises(InvalidArgument) as error:
        asyncio.run(path.validate(GenerateFields(prompt="x", **fields)))
    assert error.value.field == field


def test_the_knobs_are_in_the_response_and_the_png(path):
    result = asyncio.run(_generate(path, **BASE, guidance_stop=0.4, cache_interval=2))
    resolved = result_to_pb(result).parameters
    assert resolved.guidance_stop == pytest.approx(0.4) and resolved.cache_interval == 2
    text = Image.open(io.BytesIO(result.pngs[0])).text["parameters"]
    assert "Guidance stop: 0.4, DeepCache interval: 2" in text


@pytest.mark.parametrize("knobs", [dict(guidance_stop=0.5, cache_interval=3),
                                   dict(guidance_stop=0.4), dict(cache_interval=2)])  # fmt: skip
def test_the_eval_references_equal_the_engine(path, pipe, knobs):
    """`eval-default-model` measures the knobs on diffusers' pipeline with the references (the
    callback, the DeepCache helper, and both together): they make the engine's pixels."""
    from sdserve.shapes.evaluate import generate

    ours = asyncio.run(_generate(path, **BASE, scheduler="ddim", **knobs))
    (theirs,) = generate(pipe, [BASE["prompt"]], sampler="ddim", steps=BASE["steps"],
                         guidance=BASE["guidance_scale"], seed=BASE["seed"], **knobs)  # fmt: skip
    assert np.abs(_pixels(ours.pngs[0]) - np.asarray(theirs).astype(int)).max() <= 2
