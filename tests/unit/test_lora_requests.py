"""LoRA adapters named by requests (issue 17) on the request path over the in-process stages:
adapters from the model's `loras/` folder, mixed in one batch, validated by name."""

from __future__ import annotations

import asyncio
import io

import numpy as np
import pytest
from PIL import Image

from sdserve.api.types import GenerateFields, Result
from sdserve.errors import FailedPrecondition, InvalidArgument

MIX = [(), (("ink", 0.8),), (("grain", 1.0),), (("ink", 0.5), ("grain", 1.2))]


def _pixels(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"), dtype=np.int16)


def _request(loras, seed: int) -> GenerateFields:
    return GenerateFields(prompt="a cat", steps=5, seed=seed, scheduler="ddim", loras=loras)


async def _png(path, request) -> tuple[bytes, object]:
    params = await path.validate(request)
    result = [e async for e in path.run(params) if isinstance(e, Result)][0]
    return result.pngs[0], result.params


def test_mixed_adapters_share_forwards_and_each_equals_its_solo_run(in_process_path, tiny_loras):
    path = in_process_path
    requests = [_request(loras, seed=i) for i, loras in enumerate(MIX)]

    async def together():
        return await asyncio.gather(*(_png(path, r) for r in requests))

    before = path.client.denoiser.stats_message()
    batched = asyncio.run(together())
    after = path.client.denoiser.stats_message()
    assert after.shared_steps > before.shared_steps  # adapters did not split the batch
    solo = [asyncio.run(_png(path, r)) for r in requests]
    for (png, params), (alone, _), loras in zip(batched, solo, MIX, strict=True):
        assert params.loras == loras
        assert np.abs(_pixels(png) - _pixels(alone)).max() <= 2
        if loras:
            text = Image.open(io.BytesIO(png)).text["parameters"]
            assert "LoRA: " + " ".join(f"{n}:{s:g}" for n, s in loras) in text
    base = _pixels(batched[0][0])
    assert all(np.abs(_pixels(png) - base).max() > 10 for png, _ in batched[1:])


@pytest.mark.parametrize(
    ("loras", "field", "words"),
    [
        ((("nope", 1.0),), "loras[0].name", "has no adapter 'nope'; it has: broken, grain, ink"),
        ((("ink", 3.0),), "loras[0].scale", "within -2..2"),
        ((("ink", 1.0), ("ink", 0.5)), "loras[1].name", "given twice"),
        ((("a", 1.0), ("b", 1.0), ("c", 1.0), ("d", 1.0), ("e", 1.0)), "loras", "at most 4"),
        ((("../x", 1.0),), "loras[0].name", "not an adapter name"),
    ],
)
def test_bad_adapters_are_invalid_argument_naming_them(in_process_path, tiny_loras, loras,
                                                        field, words):  # fmt: skip
    with pytest.raises(InvalidArgument) as err:
        asyncio.run(in_process_path.validate(_request(loras, seed=0)))
    assert err.value.field == field and words in str(err.value)


def test_a_broken_adapter_file_is_failed_precondition_and_serving_goes_on(in_process_path,
                                                                         tiny_loras):  # fmt: skip
    with pytest.raises(FailedPrecondition) as err:
        asyncio.run(_png(in_process_path, _request((("broken", 1.0),), seed=0)))
    assert "adapter 'broken'" in str(err.value)
    png, _ = asyncio.run(_png(in_process_path, _request((("ink", 1.0),), seed=0)))
    assert png[:4] == b"\x89PNG"


def test_list_loras_says_which_are_loaded(in_process_path, tiny_loras):
    asyncio.run(_png(in_process_path, _request((("grain", 1.0),), seed=3)))
    model, files = asyncio.run(in_process_path.loras())
    assert model == "default"
    listed = {f.name: f for f in files}
    assert set(listed) == {"broken", "grain", "ink"} and listed["grain"].loaded
    assert listed["grain"].file_bytes == tiny_loras["grain"].stat().st_size


def test_the_one_set_policy_keeps_adapter_sets_apart(in_process_path, tiny_loras):
    """engine.lora_policy one_set (the comparison in bench/bench_lora.py): requests of
    different adapter sets never share a forward, and their images do not change."""
    path = in_process_path
    engine = path.client.denoiser.engine
    requests = [_request(loras, seed=i) for i, loras in enumerate(MIX[1:3])]

    async def together():
        return await asyncio.gather(*(_png(path, r) for r in requests))

    mixed = asyncio.run(together())
    engine.lora_policy = "one_set"
    try:
        before = path.client.denoiser.stats_message()
        apart = asyncio.run(together())
        after = path.client.denoiser.stats_message()
    finally:
        engine.lora_policy = "mixed"
    assert after.shared_steps == before.shared_steps
    assert after.unet_steps - before.unet_steps == 2 * 5  # each set's 5 steps on its own
    for (a, _), (b, _) in zip(mixed, apart, strict=True):
        assert np.abs(_pixels(a) - _pixels(b)).max() <= 2
