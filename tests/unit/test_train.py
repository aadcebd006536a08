"""The training script of the default model (issue 6) runs end to end and writes a loadable fp16
model; its tokenizer spells every word of the grammar as one token."""

from __future__ import annotations

import json

import pytest
import torch


def test_the_tokenizer_has_one_token_per_word_of_the_grammar(tmp_path):
    from transformers import CLIPTokenizer

    from sdserve.shapes.train import grammar_words, write_word_tokenizer

    write_word_tokenizer(tmp_path)
    tokenizer = CLIPTokenizer.from_pretrained(tmp_path, local_files_only=True)
    for word in grammar_words():
        assert tokenizer.tokenize(word) == [f"{word}</w>"]
    assert tokenizer.tokenize("a small red circle on a blue background") == [
        "a</w>", "small</w>", "red</w>", "circle</w>", "on</w>", "a</w>", "blue</w>",
        "background</w>",
    ]  # fmt: skip
    # Any other text still tokenizes, a character at a time, without unknown tokens.
    ids = tokenizer("zebra!").input_ids
    assert tokenizer.unk_token_id not in ids[1:-1] and len(ids) > 3


def test_a_few_training_steps_write_a_loadable_fp16_model(tmp_path):
    from diffusers import StableDiffusionPipeline
    from safetensors import safe_open

    from sdserve.pipeline.models import check_model_dir, vae_scale_factor
    from sdserve.shapes.recipe import TrainConfig
    from sdserve.shapes.train import new_model, train

    model = new_model(tmp_path / "model", seed=0)
    before = StableDiffusionPipeline.from_pretrained(model, local_files_only=True)
    seen = []
    config = TrainConfig(samples=16, vae_steps=2, unet_steps=3, batch_size=4, vae_batch_size=4,
                         warmup_steps=1, unet_lr=1e-2)  # fmt: skip
    report = train(
        model, config, progress=lambda phase, step, total, loss: seen.append((phase, step))
    )
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
    # The latents' scaling factor was measured, and the 64x64 images have 16x16 latents.
    assert after.vae.config.scaling_factor == pytest.approx(report["vae_scaling_factor"], rel=1e-4)
    assert report["vae_scaling_factor"] != 1.0
    assert vae_scale_factor(dict(after.vae.config)) * after.unet.config.sample_size == 64
    assert json.loads((model / "training.json").read_text())["config"]["unet_steps"] == 3
    scheduler = json.loads((model / "scheduler" / "scheduler_config.json").read_text())
    assert scheduler["beta_schedule"] == "scaled_linear"
