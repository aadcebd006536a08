"""Batching a stage's calls across requests (`stages.batching.CallBatcher`), and the stages
that use it: a diffusion transformer's CLIP and T5 encodes, and the VAE decoder."""

from __future__ import annotations

import asyncio
import io
import threading

import numpy as np
import pytest
import torch
from PIL import Image

from sdserve.stages.batching import CallBatcher
from sdserve.stages.runtime import TorchThread


def _busy_then(thread: TorchThread, calls):
    """Runs `calls` (coroutines) while the torch thread is held busy, then frees it: they
    all wait for it, as requests do behind a Denoiser step."""

    async def main():
        gate = threading.Event()
        thread.submit(gate.wait)
        tasks = [asyncio.ensure_future(c) for c in calls]
        await asyncio.sleep(0.05)  # every call is queued behind the busy thread
        gate.set()
        return await asyncio.gather(*tasks, return_exceptions=True)

    return asyncio.run(main())


def test_calls_waiting_for_the_thread_run_as_one_batch_per_key():
    thread, seen = TorchThread("test-batching"), []

    def run(reqs):
        seen.append(list(reqs))
        if "bd" in reqs:
            raise ValueError("bad request")
        return [r.upper() for r in reqs]

    batcher = CallBatcher(thread.submit, run, key=len, max_batch=3)
    out = _busy_then(thread, [batcher(r) for r in ["ab", "cd", "e", "ef", "gh", "bd", "xy"]])
    assert out[:5] == ["AB", "CD", "E", "EF", "GH"] and out[6] == "XY"
    assert isinstance(out[5], ValueError)  # the bad one alone fails
    # length 2: ab cd ef | gh bd xy (fails, then each alone); length 1: e
    assert seen == [["ab", "cd", "ef"], ["gh", "bd", "xy"], ["gh"], ["bd"], ["xy"], ["e"]]
    assert batcher.calls == 6  # every call but the bad one answered
    # an idle thread runs a call at once, alone
    assert asyncio.run(batcher("zz")) == "ZZ" and seen[-1] == ["zz"]
    thread.close()


def test_a_call_whose_caller_went_away_is_left_out():
    thread, seen = TorchThread("test-batching"), []
    batcher = CallBatcher(thread.submit, lambda reqs: seen.append(list(reqs)) or reqs)

    async def main():
        gate = threading.Event()
        thread.submit(gate.wait)
        kept, gone = asyncio.ensure_future(batcher("kept")), asyncio.ensure_future(batcher("gone"))
        await asyncio.sleep(0.05)
        gone.cancel()
        await asyncio.sleep(0)
        gate.set()
        return await kept

    assert asyncio.run(main()) == "kept" and seen == [["kept"]]
    thread.close()


@pytest.fixture(scope="module")
def flux_services(tiny_flux_model):
    from sdserve.pipeline.dit_text import ClipEncoders
    from sdserve.pipeline.vae import VaeDecoder
    from sdserve.stages.text_encoder import TextEncoderService
    from sdserve.stages.vae_decoder import VaeDecoderService

    thread = TorchThread("test-flux")
    text = TextEncoderService(thread.call(ClipEncoders, tiny_flux_model, "cpu", "float32"),
                              thread)  # fmt: skip
    vae = VaeDecoderService(thread.call(VaeDecoder, tiny_flux_model, "cpu", "float32"), thread)
    yield thread, text, vae
    thread.close()


def test_batched_encodes_and_decodes_equal_each_alone(flux_services):
    """Four requests encoded (CLIP and T5, two T5 lengths) and decoded while the thread is
    busy: fewer batches than calls, and each result equals that request's alone."""
    from sdserve.stages.messages import Decode, EncodeText

    thread, text, vae = flux_services
    reqs = [EncodeText(str(i), f"prompt {i}", "blurry", with_uncond=i % 2 == 0,
                       max_sequence_length=32 if i < 3 else 16) for i in range(4)]  # fmt: skip
    alone = [(asyncio.run(text.encode(r)), asyncio.run(text.encode_t5(r))) for r in reqs]
    clip_batches, t5_batches = text._clip_calls.batches, text._t5_calls.batches
    together = _busy_then(thread, [text.encode(r) for r in reqs] + [text.encode_t5(r)
                                                                    for r in reqs])  # fmt: skip
    assert text._clip_calls.batches == clip_batches + 1  # the four in one forward
    assert text._t5_calls.batches == t5_batches + 2  # one per T5 length
    for (clip, t5), batched_clip, batched_t5 in zip(alone, together[:4], together[4:],
                                                    strict=True):  # fmt: skip
        assert torch.allclose(clip.cond_pooled, batched_clip.cond_pooled, atol=1e-5)
        assert torch.allclose(t5.cond, batched_t5.cond, atol=1e-5)
        assert (t5.uncond is None) == (batched_t5.uncond is None)
    latents = [torch.randn(n, 16, 8, 8, generator=torch.Generator().manual_seed(n))
               for n in (1, 2)]  # fmt: skip
    decodes = [Decode(str(n), x, tuple(f"image {n}.{k}" for k in range(len(x))))
               for n, x in enumerate(latents)]  # fmt: skip
    solo = [asyncio.run(vae.decode(d)) for d in decodes]
    batches = vae._calls.batches
    together = _busy_then(thread, [vae.decode(d) for d in decodes])
    assert vae._calls.batches == batches + 1 and [len(p) for p in together] == [1, 2]
    for alone_pngs, batched_pngs in zip(solo, together, strict=True):
        for alone_png, batched_png in zip(alone_pngs, batched_pngs, strict=True):
            alone_image, batched_image = (
                Image.open(io.BytesIO(alone_png)),
                Image.open(io.BytesIO(batched_png)),
            )
            assert alone_image.text == batched_image.text  # each image keeps its own text
            # a batched convolution rounds a few values differently: 1/255 on a few pixels
            assert np.abs(np.asarray(alone_image, int) - np.asarray(batched_image, int)).max() <= 1


def test_batch_invariance_decodes_each_image_alone(flux_services):
    from sdserve.config import SdserveConfig

    _, text, vae = flux_services
    vae.configure(SdserveConfig(engine={"batch_invariant": True}), None)
    assert vae.max_batch == 1
    vae.configure(SdserveConfig(engine={"max_batch_size": 8}), None)
    text.configure(SdserveConfig(engine={"max_batch_size": 8}), None)
    assert vae.max_batch == text.max_batch == 8
