"""The default model's own adapter (issue 17): the checker knows cyan, `sdserve train-lora` writes
an adapter that sdserve's pipeline loads, and the shipped `loras/cyan` draws cyan where the base
model does not, through the per-row path (rows with and without it in the same forwards)."""

from __future__ import annotations

import json
import random
from collections import Counter

import pytest
import torch

from sdserve.cli import main
from sdserve.constants import DEFAULT_MODEL_DIR
from sdserve.shapes.adherence import (
    ShapeClassifier,
    background_color,
    check,
    foreground_color,
    palette_for,
)
from sdserve.shapes.synthetic import (
    ALL_COLORS,
    COLORS,
    EXTRA_COLORS,
    Caption,
    caption_with,
    dataset,
    parse_prompt,
    random_caption,
    render,
)

SHIPPED = DEFAULT_MODEL_DIR / "loras" / "cyan" / "pytorch_lora_weights.safetensors"


@pytest.fixture(scope="module")
def shapes():
    return ShapeClassifier.fit()


def test_cyan_is_opt_in_and_the_grammar_of_the_base_model_is_unchanged():
    from sdserve.shapes.train import grammar_words

    assert len(COLORS) == 8 and "cyan" not in COLORS and "cyan" not in grammar_words()
    assert EXTRA_COLORS["cyan"] not in COLORS.values() and ALL_COLORS == COLORS | EXTRA_COLORS
    prompt = "a large cyan circle on a red background"
    assert parse_prompt(prompt) is None
    assert parse_prompt(prompt, colors=ALL_COLORS) == Caption("cyan", "circle", "red", "large")
    rng, again = random.Random(4), random.Random(4)
    assert [random_caption(rng) for _ in range(50)] == [
        random_caption(again, colors=COLORS) for _ in range(50)
    ]
    drawn = {random_caption(rng, colors=ALL_COLORS).color for _ in range(200)}
    assert "cyan" in drawn


def test_the_evaluation_prompts_are_held_out_of_the_training_data():
    from sdserve.shapes.lora_recipe import (
        LORA_EVAL_SEED,
        LoraTrainConfig,
        held_out_captions,
        retired_captions,
    )
    from sdserve.shapes.lora_train import training_captions
    from sdserve.shapes.recipe import EVAL_SEED

    held, retired = held_out_captions("cyan"), retired_captions("cyan")
    assert len(set(held)) == 64 and held_out_captions("cyan", 8) == held[:8]
    assert set(held).isdisjoint(retired) and len(set(retired)) == 32  # issue 17's set
    assert [c.background == "cyan" for c in held] == [i % 2 == 1 for i in range(64)]
    for side in (held[0::2], held[1::2]):  # every other color 4 times, shapes and sizes even
        others = Counter(c.background if c.color == "cyan" else c.color for c in side)
        assert others == dict.fromkeys(COLORS, 4)
        for counts in (Counter(c.shape for c in side), Counter(c.size_word for c in side)):
            assert sorted(counts.values()) == [10, 11, 11]
    old_seeds = {EVAL_SEED + i for i in range(32)}  # issue 17's noise
    assert old_seeds.isdisjoint(LORA_EVAL_SEED + i for i in range(64))
    config = LoraTrainConfig()
    trained = training_captions(config)
    seen = {c.prompt for c in trained}
    assert seen.isdisjoint(c.prompt for c in held) and seen.isdisjoint(c.prompt for c in retired)
    assert sum("cyan" in p for p in seen) == 144 - 64 - 32  # every other cyan prompt is trained on
    n_cyan = round(config.samples * config.new_color_share)
    assert sum(c.color == "cyan" for c in trained) == round(n_cyan * config.fg_share)
    assert sum("cyan" in (c.color, c.background) for c in trained) == n_cyan


def test_checker_judges_cyan_renders_cyan_and_the_8_colors_as_before(shapes):
    rng = random.Random(11)
    cyans = [caption_with(rng, "cyan", as_background=i % 2 == 1) for i in range(60)]
    for caption in cyans:
        image = render(caption, rng)
        verdict = check(image, caption, shapes)
        assert verdict.color and verdict.background, caption
        where = background_color(image) if caption.background == "cyan" else foreground_color(image)
        assert where == "cyan", caption  # also with every color the checker knows
    for caption, image in dataset(300, seed=99):  # as test_adherence: every color right
        assert palette_for(caption) == tuple(COLORS)
        verdict = check(image, caption, shapes)
        assert verdict.color and verdict.background, caption
        assert foreground_color(image) == caption.color  # the full palette changes nothing
        assert background_color(image) == caption.background


def test_check_image_knows_cyan(tmp_path, capsys):
    caption = Caption("yellow", "square", "cyan", "large")
    path = tmp_path / "cyan.png"
    render(caption, random.Random(0)).save(path)
    assert main(["check-image", str(path), caption.prompt]) == 0
    assert "background color: cyan (as prompted)" in capsys.readouterr().out
    assert main(["check-image", str(path), "a red square on a cyan background"]) == 1
    out = capsys.readouterr().out
    assert "foreground color: yellow (prompt: red)" in out
    assert "background color: cyan (as prompted)" in out


def _denoise(model_dir, prompt: str, loras=(), steps: int = 4) -> torch.Tensor:
    text, denoiser = _parts(model_dir)
    emb = text.encode(prompt, "", True, loras=loras)
    return denoiser.denoise(emb.cond, emb.uncond, width=64, height=64, steps=steps,
                            guidance_scale=7.5, scheduler="ddim", seeds=[3],
                            loras=loras)  # fmt: skip


_PARTS: dict = {}


def _parts(model_dir):
    from sdserve.pipeline.denoise import Denoiser
    from sdserve.pipeline.text import TextEncoder

    if model_dir not in _PARTS:
        _PARTS[model_dir] = (TextEncoder(model_dir, dtype="float32"),
                             Denoiser(model_dir, dtype="float32"))  # fmt: skip
    return _PARTS[model_dir]


def test_a_few_train_lora_steps_write_an_adapter_that_loads_and_changes_the_output(tmp_path):
    from sdserve.pipeline.lora import load_lora

    out = tmp_path / "cyan"
    argv = ["train-lora", str(out), "--steps", "3", "--rank", "2", "--samples", "24",
            "--batch-size", "4", "--lr", "0.02", "--eval-prompts", "0",
            "--pixel-weight", "1", "--fg-share", "0.75", "--mid-convs"]  # fmt: skip
    assert main(argv) == 0
    weights = out / "pytorch_lora_weights.safetensors"
    card = (out / "README.md").read_text()
    assert "sdserve train-lora" in card and "--steps 3 --rank 2" in card and "cyan" in card
    assert "--pixel-weight 1" in card and "pixel loss on 8 rows" in card
    assert "--fg-share 0.75" in card and "75% of those as the shape's color" in card
    assert "--mid-convs" in card and "middle up block (8x8 latents)" in card
    text, denoiser = _parts(DEFAULT_MODEL_DIR)
    adapter = load_lora(weights, "cyan", denoiser.unet, text.model)
    assert adapter.unet and adapter.text_encoder  # both parts were trained
    assert all(f.rank == 2 and f.scale == 1.0 for f in adapter.unet.values())
    assert {"up_blocks.1.upsamplers.0.conv", "up_blocks.2.resnets.1.conv2"} <= set(adapter.unet)
    prompt = "a cyan circle on a red background"
    base = _denoise(DEFAULT_MODEL_DIR, prompt)
    adapted = _denoise(DEFAULT_MODEL_DIR, prompt, loras=((adapter, 1.0),))
    assert (adapted - base).abs().max() > 1e-3
    assert torch.equal(_denoise(DEFAULT_MODEL_DIR, prompt), base)  # base weights untouched


def test_ctrl_c_stops_the_training_and_keeps_what_was_trained(tmp_path):
    from sdserve.shapes.lora_recipe import LoraTrainConfig
    from sdserve.shapes.lora_train import train_lora

    def progress(phase, step, total, loss):
        if phase == "lora" and step == 2:
            raise KeyboardInterrupt

    config = LoraTrainConfig(steps=6, rank=2, samples=16, batch_size=4, invert_steps=1)
    report = train_lora(tmp_path / "stopped", config, progress=progress)
    assert report["interrupted"] and report["steps_done"] == 2
    assert (tmp_path / "stopped" / "pytorch_lora_weights.safetensors").is_file()


def test_the_shipped_adapter_draws_cyan_where_the_base_model_does_not(tmp_path, capsys):
    """A small version of the adapter's card: 4 held-out cyan prompts (2 as the shape's color,
    2 as the background) and 4 ordinary ones, with and without the adapter, in shared batches."""
    assert SHIPPED.is_file() and (SHIPPED.parent / "README.md").is_file()
    out = tmp_path / "eval.json"
    assert main(["eval-default-model", "--lora", "cyan", "-n", "4", "--json", str(out)]) == 0
    assert "(a) new color, with the adapter" in capsys.readouterr().out
    (result,) = json.loads(out.read_text())
    groups = {g: r["score"] for g, r in result["groups"].items()}
    print(groups)
    assert result["mixed_forwards"] == result["forwards"] == 25  # every forward mixed them
    assert groups["new+lora"] >= 0.75 and groups["new-lora"] <= 0.25, groups
    assert groups["base-lora"] == 1.0 and groups["base+lora"] >= 0.75, groups


def test_eval_of_an_unknown_adapter_names_the_models_own(capsys):
    assert main(["eval-default-model", "--lora", "nope"]) == 2
    err = capsys.readouterr().err
    assert "no LoRA 'nope'" in err and "(cyan)" in err
