"""Compiled U-Net forwards (`engine.compile`, sdserve/pipeline/compiled.py): warm-up compiles,
steady state never does, and padding rows leave the real rows' pixels alone.

The stages run in this machine's default dtype (`auto`). One test compiles with inductor (the
CPU default: one dynamic graph); the bucket tests use torch.compile's "eager" backend, which
traces and guards as inductor does without generating kernels, so they take seconds."""

import numpy as np
import pytest
from helpers import solo_latents

from sdserve.pipeline.compiled import CompiledUNet
from sdserve.pipeline.denoise import Denoiser
from sdserve.pipeline.engine import DenoiseEngine, Finished
from sdserve.pipeline.text import TextEncoder
from sdserve.pipeline.vae import VaeDecoder

REQUESTS = [  # steps, samplers, guidance and two sizes (latents 8x8 and 8x12)
    dict(steps=3, scheduler="ddim", guidance=7.5, width=64, height=64, seeds=(1,)),
    dict(steps=5, scheduler="euler", guidance=1.0, width=96, height=64, seeds=(2,)),
    dict(steps=4, scheduler="dpmpp_2m", guidance=3.0, width=64, height=64, seeds=(3, 4)),
    dict(steps=6, scheduler="euler_ancestral", guidance=7.5, width=96, height=64, seeds=(5,)),
    dict(steps=2, scheduler="ddim", guidance=1.0, width=64, height=64, seeds=(6,)),
]


@pytest.fixture(scope="module")
def text_and_vae(tiny_model):
    return TextEncoder(tiny_model), VaeDecoder(tiny_model)


def _run_together(text, denoiser, requests, forward) -> dict[int, object]:
    """The requests through one engine on `forward`, the later ones joining at later steps:
    {index: final latents}."""
    engine = DenoiseEngine(denoiser.unet, max_batch_size=16, forward=forward)
    done: dict[int, object] = {}
    for i, r in enumerate(requests):
        emb = text.encode(f"prompt {i}", "", with_uncond=r["guidance"] > 1)
        job = denoiser.make_job(
            f"r{i}", emb.cond, emb.uncond, width=r["width"], height=r["height"],
            steps=r["steps"], guidance_scale=r["guidance"], scheduler=r["scheduler"],
            seeds=list(r["seeds"]),
            on_event=lambda e, i=i: done.__setitem__(i, e.latents) if isinstance(e, Finished)
            else None,
        )  # fmt: skip
        engine.submit(job)
        engine.step()  # the next request joins a batch already running
    for _ in range(1000):
        if engine.step() is None and engine.counts() == (0, 0):
            return done
    raise AssertionError("engine did not drain")


def _pixels(vae, latents) -> np.ndarray:
    return vae.decode(latents).astype(int)


def test_inductor_serves_a_mixed_load_without_recompiling(tiny_model, text_and_vae):
    """The CPU default: one dynamic graph, compiled at warm-up (native size and a second
    size), then a mixed load (steps, samplers, guidance, two sizes, 1 to 8 rows per forward)
    compiles nothing more. Compiled kernels round differently from eager ones (inductor keeps
    some intermediates in float32), so in bfloat16 the images are not the eager ones to the
    level; they are as close to the float32 images as the eager bfloat16 ones are."""
    text, vae = text_and_vae
    compiled = Denoiser(tiny_model)
    events = []
    compiled.compile("default", None, sizes=[(96, 64)], max_rows=32,
                     on_compile=lambda *event: events.append(event))  # fmt: skip
    assert compiled.forward.compiles >= 1 and all(warmup for *_, warmup in events)
    warm = compiled.forward.compiles
    together = _run_together(text, compiled, REQUESTS, compiled.forward)
    assert compiled.forward.compiles == warm  # zero recompiles after warm-up
    eager, exact = Denoiser(tiny_model), Denoiser(tiny_model, dtype="float32")
    for i, r in enumerate(REQUESTS):
        ours = _pixels(vae, together[i])
        reference = _pixels(vae, solo_latents(text, exact, prompt=f"prompt {i}", **r))
        uncompiled = _pixels(vae, solo_latents(text, eager, prompt=f"prompt {i}", **r))
        gap, eager_gap = np.abs(ours - reference), np.abs(uncompiled - reference)
        assert gap.mean() <= eager_gap.mean() + 0.5 and gap.max() <= 24, (i, gap.max())
        assert np.abs(ours - uncompiled).mean() <= 2.0


def test_buckets_pad_rows_and_compile_each_bucket_once(tiny_model, text_and_vae):
    """Static graphs per bucket (the CUDA default): a forward of 1 or 2 rows runs padded to 2,
    3 or 4 rows padded to 4, more than 4 eagerly; warm-up compiled both buckets at the native
    size, the load compiles nothing more, and the second size is a counted recompile."""
    text, vae = text_and_vae
    denoiser = Denoiser(tiny_model)
    events = []
    forward = CompiledUNet(denoiser.unet, "default", (2, 4), backend="eager",
                           on_compile=lambda *event: events.append(event))  # fmt: skip
    shape = denoiser.latent_shape(64, 64)
    forward.warm_up([shape], denoiser.example_inputs)
    assert [(bucket, warmup) for bucket, _, _, warmup in events] == [(2, True), (4, True)]
    assert [forward.bucket_for(rows) for rows in (1, 2, 3, 4, 5)] == [2, 2, 4, 4, None]
    square = [r for r in REQUESTS if r["width"] == 64]
    _run_together(text, denoiser, square, forward)
    assert forward.compiles == 2
    _run_together(text, denoiser, [REQUESTS[1]], forward)  # 96x64: not warmed
    assert forward.compiles == 3 and events[-1][0] == 2 and events[-1][3] is False


def test_padding_rows_do_not_change_a_real_rows_pixels(tiny_model, text_and_vae):
    """An image alone (its two rows padded to a bucket of 4 with zero rows) and beside another
    guided image (4 real rows, no padding) has the same pixels."""
    text, vae = text_and_vae
    denoiser = Denoiser(tiny_model)
    forward = CompiledUNet(denoiser.unet, "default", (4,), backend="eager")
    denoiser.forward = forward
    target = dict(steps=4, scheduler="euler_ancestral", guidance=7.5, width=64, height=64,
                  seeds=(11,))  # fmt: skip
    alone = _run_together(text, denoiser, [target], forward)[0]
    beside = _run_together(text, denoiser, [target, dict(target, seeds=(12,))], forward)[0]
    assert np.abs(_pixels(vae, alone) - _pixels(vae, beside)).max() == 0
    assert forward.compiles == 1  # both ran the one bucket


def test_auto_compiles_a_small_u_net_on_a_cpu_and_leaves_a_large_one_eager(tiny_model):
    """`engine.compile: auto` on a CPU decides by a measured forward of one guided image: the
    tiny U-Net's is milliseconds, so it compiles; SD 1.5's (seconds) runs eagerly. A setting
    other than auto is taken as given and measures nothing."""
    import torch

    from sdserve.pipeline.compiled import BIG_FORWARD_S, resolve_mode

    denoiser = Denoiser(tiny_model, dtype="float32")
    seconds = denoiser.forward_seconds("auto")
    assert 0 < seconds < BIG_FORWARD_S
    assert resolve_mode("auto", denoiser.device, seconds) == "default"
    assert resolve_mode("auto", torch.device("cpu"), 6.5) == "off"
    assert resolve_mode("auto", torch.device("cuda"), 6.5) == "max-autotune"
    assert denoiser.forward_seconds("off") == 0.0
    assert resolve_mode("max-autotune", torch.device("cpu"), 6.5) == "max-autotune"
    with pytest.raises(ValueError, match="unknown compile mode"):
        resolve_mode("fast", torch.device("cpu"))
