"""engine.lora_policy with ControlNets: one_set never mixes ControlNet sets in a forward (the
comparison of bench/bench_controlnet.py), mixed does, and the images are the same either way."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from sdserve.pipeline.controlnet import Control, load_controlnet, prepare_image
from sdserve.pipeline.denoise import Denoiser
from sdserve.pipeline.engine import DenoiseEngine
from sdserve.pipeline.text import TextEncoder
from sdserve.testing.tiny import make_tiny_model

STEPS = 4
SETS = {  # request: its ControlNets (name, scale); a1 is edges again at another scale
    "none": (),
    "a": (("edges", 1.0),),
    "a1": (("edges", 0.5),),
    "b": (("depth", 0.8),),
    "ab": (("edges", 1.0), ("depth", 1.0)),
}


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    model = make_tiny_model(tmp_path_factory.mktemp("models") / "tc", arch="tiny-controlnet")
    denoiser = Denoiser(model, dtype="float32")
    nets = {name: load_controlnet(model / "controlnets" / name, denoiser.device, torch.float32)
            for name in ("edges", "depth")}  # fmt: skip
    return TextEncoder(model, dtype="float32"), denoiser, nets


def _run(parts, policy: str) -> tuple[list[tuple[str, ...]], dict[str, torch.Tensor]]:
    """Every request of SETS together; (each forward's request ids, each request's latents)."""
    text, denoiser, nets = parts
    ramp = np.tile(np.linspace(0, 255, 64, dtype=np.uint8), (64, 1))
    image = prepare_image(Image.fromarray(np.stack([ramp] * 3, axis=-1)), 64, 64)
    emb = text.encode("a red circle", "", with_uncond=True)
    engine = DenoiseEngine(denoiser.unet, lora_policy=policy)
    jobs = {}
    for i, (name, entries) in enumerate(SETS.items()):
        controls = [Control(nets[net], image, scale) for net, scale in entries]
        jobs[name] = denoiser.make_job(name, emb.cond, emb.uncond, width=64, height=64,
                                       steps=STEPS, guidance_scale=7.5, scheduler="ddim",
                                       seeds=[i], controls=controls)  # fmt: skip
        engine.submit(jobs[name])
    forwards = []
    while engine.counts() != (0, 0):
        stats = engine.step()
        if stats is not None:
            forwards.append(stats.request_ids)
    return forwards, {name: job.samples[0].latents for name, job in jobs.items()}


def test_one_set_never_mixes_controlnet_sets_in_a_forward(parts):
    mixed, mixed_latents = _run(parts, "mixed")
    apart, apart_latents = _run(parts, "one_set")
    assert mixed == [tuple(SETS)] * STEPS  # every set in every forward
    nets_of = {name: tuple(net for net, _ in entries) for name, entries in SETS.items()}
    assert all(len({nets_of[r] for r in ids}) == 1 for ids in apart)  # one set per forward
    assert ("a", "a1") in apart  # the same net at another scale is the same set
    assert len(apart) == 4 * STEPS  # the four sets take turns
    for name in SETS:
        torch.testing.assert_close(apart_latents[name], mixed_latents[name], atol=1e-4, rtol=0)
