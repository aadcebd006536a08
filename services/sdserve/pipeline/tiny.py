"""A tiny random-weight Stable Diffusion in the SD 1.x folder layout.

The parts have SD 1.5's architecture at a fraction of its width (see `TINY_*` below): a CLIP text
encoder, a UNet2DConditionModel with cross-attention down/up blocks, an AutoencoderKL with four
blocks (so latents are 8x smaller per side, as in SD), a CLIP BPE tokenizer and SD 1.5's PNDM
scheduler config. `diffusers.StableDiffusionPipeline.from_pretrained(folder)` loads it. It makes
noise, not pictures, but it exercises every code path in a few milliseconds per step on a CPU.
The same seed gives byte-identical weight files.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

TINY_VERSION = "tiny-v1"
"""Named in the model's README; bump when the architecture below changes."""

TINY_TEXT_ENCODER = dict(
    hidden_size=32,
    intermediate_size=64,
    num_attention_heads=4,
    num_hidden_layers=2,
    max_position_embeddings=77,
    hidden_act="quick_gelu",
    projection_dim=32,
)
TINY_UNET = dict(
    sample_size=8,  # 8x8 latents -> 64x64 pixels
    in_channels=4,
    out_channels=4,
    layers_per_block=1,
    block_out_channels=(32, 64),
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=32,
    attention_head_dim=8,
    norm_num_groups=32,
)
TINY_UNET_SD15_LAYOUT = dict(
    TINY_UNET,
    # SD 1.5's block structure (4 levels, 2 layers per block, cross-attention in the first 3)
    # at a narrow width: per-forward overhead dominates on a CPU, as on a GPU at SD sizes.
    layers_per_block=2,
    block_out_channels=(32, 64, 64, 64),
    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
)
TINY_VAE = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(32, 32, 32, 32),
    layers_per_block=1,
    latent_channels=4,
    norm_num_groups=32,
    sample_size=64,
    scaling_factor=0.18215,
)
# Stable Diffusion 1.5's own architecture (random weights, for benchmarks). Parameter counts:
# U-Net 859.52 M, VAE 83.65 M, text encoder 123.06 M.
SD15_TEXT_ENCODER = dict(
    hidden_size=768,
    intermediate_size=3072,
    num_attention_heads=12,
    num_hidden_layers=12,
    max_position_embeddings=77,
    hidden_act="quick_gelu",
    projection_dim=768,
    vocab_size=49408,
)
SD15_UNET = dict(
    sample_size=64,
    in_channels=4,
    out_channels=4,
    layers_per_block=2,
    block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    cross_attention_dim=768,
    attention_head_dim=8,
)
SD15_VAE = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(128, 256, 512, 512),
    layers_per_block=2,
    latent_channels=4,
    sample_size=512,
    scaling_factor=0.18215,
)
SD15_SCHEDULER = dict(
    _class_name="PNDMScheduler",
    _diffusers_version="0.6.0",
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    num_train_timesteps=1000,
    set_alpha_to_one=False,
    skip_prk_steps=True,
    steps_offset=1,
    clip_sample=False,
    trained_betas=None,
)


def byte_level_vocab() -> dict[str, int]:
    """A CLIP BPE vocabulary of the 256 byte symbols (plain and word-final), used with no merges.

    Every text tokenizes (one token per character), which is all a random-weight model needs.
    """
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    symbols = list(bytes_to_unicode().values())
    tokens = ["<|startoftext|>", "<|endoftext|>"] + symbols + [s + "</w>" for s in symbols]
    return {tok: i for i, tok in enumerate(tokens)}


def _write_tokenizer(out: Path) -> dict[str, int]:
    from transformers import CLIPTokenizer

    vocab = byte_level_vocab()
    # model_max_length: a hand-made CLIPTokenizer needs it given explicitly.
    tokenizer = CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77)
    tokenizer.save_pretrained(out)
    return {
        "vocab_size": len(vocab),
        "bos_token_id": vocab["<|startoftext|>"],
        "eos_token_id": vocab["<|endoftext|>"],
        "pad_token_id": vocab["<|endoftext|>"],
    }


def sd_pipeline(vae, text_encoder, tokenizer, unet):
    """A StableDiffusionPipeline of these parts, with SD 1.5's scheduler and no safety checker."""
    from diffusers import PNDMScheduler, StableDiffusionPipeline

    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=PNDMScheduler.from_config(SD15_SCHEDULER),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def save_sd_folder(pipe, out: Path) -> None:
    """`pipe.save_pretrained(out)` with safetensors, keeping SD 1.5's scheduler config verbatim
    (save_pretrained rewrites it; it carries keys PNDM ignores but DDIM reads)."""
    pipe.save_pretrained(out, safe_serialization=True)
    (out / "scheduler" / "scheduler_config.json").write_text(
        json.dumps(SD15_SCHEDULER, indent=2) + "\n"
    )


ARCHS = {"tiny": TINY_UNET, "tiny-sd15-layout": TINY_UNET_SD15_LAYOUT}
"""U-Net presets of make_tiny_model; the text encoder and VAE are the same for both."""


def make_tiny_model(out_dir: str | Path, seed: int = 0, arch: str = "tiny") -> Path:
    """Writes the tiny model to `out_dir` (which must not exist yet, or be empty).

    The folder is built in a temporary sibling and renamed into place, so concurrent callers
    never see a half-written folder.
    """
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    out = Path(out_dir).expanduser()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        token_ids = _write_tokenizer(tmp / "tokenizer")
        from transformers import CLIPTokenizer

        tokenizer = CLIPTokenizer.from_pretrained(tmp / "tokenizer", local_files_only=True)

        torch.manual_seed(seed)
        text_encoder = CLIPTextModel(CLIPTextConfig(**TINY_TEXT_ENCODER, **token_ids))
        torch.manual_seed(seed + 1)
        unet = UNet2DConditionModel(**ARCHS[arch])
        torch.manual_seed(seed + 2)
        vae = AutoencoderKL(**TINY_VAE)
        save_sd_folder(sd_pipeline(vae, text_encoder, tokenizer, unet), tmp)
        (tmp / "README.md").write_text(
            f"# sdserve {TINY_VERSION} (seed {seed}, {arch})\n\n"
            "Random weights in Stable Diffusion 1.x's architecture, made by "
            f"`sdserve make-tiny-model DIR --seed {seed} --arch {arch}`. It generates noise; it "
            "is for tests and benchmarks.\n"
        )
        if out.exists():
            if any(out.iterdir()):
                raise FileExistsError(f"{out} exists and is not empty")
            out.rmdir()
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
