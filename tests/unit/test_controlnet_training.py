"""The default model's own ControlNet, `shape` (issue 28): its silhouettes are the rendered
shapes pixel for pixel, `sdserve train-controlnet`'s training writes a net that sdserve's
pipeline loads and runs, and its evaluation never meets a training triple."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from sdserve.cli import main
from sdserve.constants import DEFAULT_MODEL_DIR
from sdserve.shapes.adherence import foreground_mask, palette_for
from sdserve.shapes.controlnet_data import iou, mask_of, pairs, render_pair, silhouette
from sdserve.shapes.controlnet_recipe import CONTROLNET_EVAL_SEED, ControlNetTrainConfig
from sdserve.shapes.synthetic import SHAPES, Caption, random_caption, render

SHIPPED = DEFAULT_MODEL_DIR / "controlnets" / "shape"


def test_the_silhouette_is_the_rendered_shape_pixel_for_pixel():
    for _, image, sil in pairs(96, seed=3):
        assert iou(foreground_mask(image), mask_of(sil)) == 1.0
        assert set(np.unique(np.asarray(sil))) <= {0, 255}  # white on black, no blending
    rng, again = random.Random(5), random.Random(5)
    for _ in range(20):  # the picture is the one synthetic.render draws from the same state
        caption = random_caption(rng)
        assert caption == random_caption(again)
        image, _ = render_pair(caption, rng)
        assert np.array_equal(np.asarray(image), np.asarray(render(caption, again)))


def test_shape_silhouette_writes_the_shape_where_it_is_asked(tmp_path):
    out = tmp_path / "where.png"
    assert main(["shape-silhouette", "circle", "--at", "0.25,0.75", "--extent", "0.25",
                 str(out)]) == 0  # fmt: skip
    from PIL import Image

    mask = mask_of(Image.open(out))
    ys, xs = np.nonzero(mask)
    assert abs(xs.mean() - 16) < 1 and abs(ys.mean() - 48) < 1
    assert 14 <= xs.max() - xs.min() + 1 <= 18
    assert mask.sum() == pytest.approx(np.pi * 8**2, rel=0.2)
    for shape in SHAPES:  # each shape the checker's foreground, as the synthetic data draws it
        sil = silhouette(shape, 30, 34, 24)
        assert iou(foreground_mask(sil, ("white", "black")), mask_of(sil)) == 1.0


def test_the_evaluation_never_meets_a_training_triple():
    from sdserve.shapes.controlnet_eval import eval_cases

    config = ControlNetTrainConfig()
    cases = eval_cases()
    assert len(cases) == 64 and len({c.seed for c in cases}) == 64
    assert min(c.seed for c in cases) == CONTROLNET_EVAL_SEED > config.seed + config.samples
    assert [c.caption for c in eval_cases(8)] == [c.caption for c in cases[:8]]
    seen = {np.asarray(sil).tobytes() for _, _, sil in pairs(2048, config.seed)}
    assert not any(np.asarray(c.silhouette).tobytes() in seen for c in cases)
    assert len({c.caption.shape for c in cases}) == 3


def test_a_few_training_steps_write_a_net_the_pipeline_runs(tmp_path):
    """Three steps on the default model (batch 4) give an fp16 diffusers ControlNet folder whose
    control encoder maps 64x64 pixels to the 16x16 latents, that fits the U-Net, and that the
    evaluation runs through sdserve's own path."""
    from safetensors import safe_open

    from sdserve.pipeline.controlnet import check_fits, load_controlnet
    from sdserve.pipeline.denoise import Denoiser
    from sdserve.shapes.controlnet_eval import evaluate_controlnet
    from sdserve.shapes.controlnet_train import train_controlnet

    seen = []
    config = ControlNetTrainConfig(steps=3, samples=16, batch_size=4, warmup_steps=1, lr=1e-2)
    report = train_controlnet(
        tmp_path / "net",
        config,
        progress=lambda phase, step, total, loss: seen.append((phase, step)),
    )
    assert seen == [("latents", 1), ("controlnet", 1), ("controlnet", 2), ("controlnet", 3)]
    assert report["steps_done"] == 3 and report["loss"] > 0 and report["threads"] >= 1
    with safe_open(tmp_path / "net" / "diffusion_pytorch_model.safetensors", "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.float16}  # noqa: SIM118
    assert (tmp_path / "net" / "training.json").is_file()

    denoiser = Denoiser(DEFAULT_MODEL_DIR, dtype="float32")
    net = load_controlnet(tmp_path / "net", denoiser.device, torch.float32)
    check_fits(net, denoiser.unet, "net")
    embedding = net.controlnet_cond_embedding(torch.zeros(1, 3, 64, 64))
    assert embedding.shape == (1, 32, 16, 16)
    trained = torch.cat([p.flatten() for p in net.controlnet_down_blocks.parameters()])
    assert trained.abs().max() > 0  # its zero convolutions left zero

    result = evaluate_controlnet(DEFAULT_MODEL_DIR, tmp_path / "net", n=2, steps=2)
    assert set(result.groups) == {"control", "none"}
    assert all(len(r.ious) == 2 for r in result.groups.values())
    assert result.summary()["control"]["images"] == 2


@pytest.mark.skipif(not SHIPPED.is_dir(), reason="the shape ControlNet is not shipped")
def test_the_shipped_net_fits_the_default_model_and_is_small():
    from sdserve.pipeline.controlnet import check_fits, load_controlnet
    from sdserve.pipeline.denoise import Denoiser

    denoiser = Denoiser(DEFAULT_MODEL_DIR, dtype="float32")
    check_fits(load_controlnet(SHIPPED, denoiser.device, torch.float32), denoiser.unet, "shape")
    size = sum(p.stat().st_size for p in SHIPPED.iterdir())
    assert size < 8_000_000
    assert (SHIPPED / "README.md").is_file() and (SHIPPED / "training.json").is_file()
    assert Caption("red", "circle", "blue").prompt in (SHIPPED / "README.md").read_text()


@pytest.mark.skipif(not SHIPPED.is_dir(), reason="the shape ControlNet is not shipped")
def test_the_readme_demo_puts_the_circle_where_the_silhouette_is(tmp_path):
    """`sdserve shape-silhouette circle --at 0.3,0.6 --extent 0.4 where.png`, then `generate
    "a red circle on a blue background" --control shape=where.png`, through the request path
    (the in-process stage client, no Ray) on the default model."""
    import asyncio
    import io

    from helpers import EAGER
    from PIL import Image

    from sdserve.api.types import ControlFields, GenerateFields
    from sdserve.config import ModelConfig, SdserveConfig
    from sdserve.orchestration.in_process import InProcessStageClient
    from sdserve.orchestration.path import StagePath

    where = tmp_path / "where.png"
    assert (
        main(["shape-silhouette", "circle", "--at", "0.3,0.6", "--extent", "0.4", str(where)]) == 0
    )
    config = SdserveConfig(model=ModelConfig(path=str(DEFAULT_MODEL_DIR), dtype="float32"), **EAGER)
    client = InProcessStageClient.from_config(config)
    path = StagePath(client, config)

    async def generate(**fields):
        params = await path.validate(
            GenerateFields(prompt="a red circle on a blue background", seed=42, **fields)
        )
        return [event async for event in path.run(params)][-1]

    try:
        controls = (ControlFields("shape", where.read_bytes()),)
        image = Image.open(io.BytesIO(asyncio.run(generate(controls=controls)).pngs[0]))
    finally:
        client.close()
    fg = foreground_mask(image.convert("RGB"), palette_for(Caption("red", "circle", "blue")))
    assert iou(fg, mask_of(Image.open(where))) >= 0.7
