"""The training script (issue 6, in progress) runs end to end and writes a loadable fp16 model."""

from __future__ import annotations

import json

import torch


def test_a_few_training_steps_write_a_loadable_fp16_model(tmp_path):
    from diffusers import StableDiffusionPipeline
    from safetensors import safe_open

    from sdserve.pipeline.models import check_model_dir
    from sdserve.pipeline.tiny import make_tiny_model
    from sdserve.pipeline.train import TrainConfig, train

    model = make_tiny_model(tmp_path / "model", seed=0)
    before = StableDiffusionPipeline.from_pretrained(model, local_files_only=True)
    seen = []
    config = TrainConfig(samples=16, vae_steps=2, unet_steps=3, batch_size=4, unet_lr=1e-2)
    train(model, config, progress=lambda phase, step, total, loss: seen.append((phase, step)))
    assert seen == [("vae", 1), ("vae", 2), ("unet", 1), ("unet", 2), ("unet", 3)]

    check_model_dir(model, ("tokenizer", "text_encoder", "unet", "vae", "scheduler"))
    for part in ("unet", "vae", "text_encoder"):
        (weights,) = (model / part).glob("*.safetensors")
        with safe_open(weights, "pt") as f:
            dtypes = {f.get_tensor(k).dtype for k in f.keys()}  # noqa: SIM118 (not a dict)
            assert dtypes == {torch.float16}, part
    after = StableDiffusionPipeline.from_pretrained(model, local_files_only=True)
    changed = [
        not torch.allclose(a.float(), b.float(), atol=1e-3)
        for a, b in zip(before.unet.parameters(), after.unet.parameters(), strict=True)
    ]
    assert any(changed), "training left the U-Net as it was"
    scheduler = json.loads((model / "scheduler" / "scheduler_config.json").read_text())
    assert scheduler["beta_schedule"] == "scaled_linear"
