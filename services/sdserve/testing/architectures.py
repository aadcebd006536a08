"""Architectures of random-weight Stable Diffusion models, and building their parts in memory.

Every preset has SD 1.x's structure (CLIP text encoder, UNet2DConditionModel with
cross-attention down/up blocks, AutoencoderKL); they differ in width and depth:

- `tiny`: a 2-level U-Net at width 32, a few milliseconds per step on a CPU (the tests' model);
- `tiny-sd15-layout`: SD 1.5's 4-level block structure at a narrow width, where per-forward
  overhead dominates on a CPU, as it does on a GPU at SD sizes;
- `tiny-inpaint`: `tiny` with a 9-channel U-Net input (latents, mask, masked-image latents),
  the layout of SD's inpainting models;
- `sd15`: Stable Diffusion 1.5's own sizes (U-Net 859.52 M, VAE 83.65 M and text encoder
  123.06 M parameters), for benchmarks.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from sdserve.pipeline.models import byte_level_vocab

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
SD15_TEXT_ENCODER = dict(
    hidden_size=768,
    intermediate_size=3072,
    num_attention_heads=12,
    num_hidden_layers=12,
    max_position_embeddings=77,
    hidden_act="quick_gelu",
    projection_dim=768,
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


@dataclass(frozen=True)
class Architecture:
    """The configs of one model's three parts (keyword arguments of their diffusers or
    transformers classes)."""

    text_encoder: dict[str, Any]
    unet: dict[str, Any]
    vae: dict[str, Any]
    vocab_size: int | None = None
    """The text encoder's vocabulary; None: the byte-level vocabulary's 514 tokens."""


ARCHS = {
    "tiny": Architecture(TINY_TEXT_ENCODER, TINY_UNET, TINY_VAE),
    "tiny-sd15-layout": Architecture(TINY_TEXT_ENCODER, TINY_UNET_SD15_LAYOUT, TINY_VAE),
    "tiny-inpaint": Architecture(TINY_TEXT_ENCODER, dict(TINY_UNET, in_channels=9), TINY_VAE),
    # SD 1.5's CLIP has 49408 tokens; a byte-level tokenizer uses the first 514.
    "sd15": Architecture(SD15_TEXT_ENCODER, SD15_UNET, SD15_VAE, vocab_size=49408),
}
"""The presets by name (`sdserve make-tiny-model --arch`, the benchmarks' `--arch`)."""


def byte_level_tokenizer():
    """A CLIPTokenizer over `byte_level_vocab()` with no merges (one token per character)."""
    from transformers import CLIPTokenizer

    # model_max_length: a hand-made CLIPTokenizer needs it given explicitly.
    return CLIPTokenizer(vocab=byte_level_vocab(), merges=[], model_max_length=77)


def random_parts(arch: str, seed: int = 0) -> dict[str, Any]:
    """The parts of preset `arch` with seeded random weights, as
    {"tokenizer", "text_encoder", "unet", "vae"} (float32, on the CPU)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    spec = ARCHS[arch]
    tokenizer = byte_level_tokenizer()
    vocab = tokenizer.get_vocab()
    token_ids = {
        "vocab_size": spec.vocab_size or len(vocab),
        "bos_token_id": vocab["<|startoftext|>"],
        "eos_token_id": vocab["<|endoftext|>"],
        "pad_token_id": vocab["<|endoftext|>"],
    }
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(CLIPTextConfig(**spec.text_encoder, **token_ids))
    torch.manual_seed(seed + 1)
    unet = UNet2DConditionModel(**spec.unet)
    torch.manual_seed(seed + 2)
    vae = AutoencoderKL(**spec.vae)
    parts = {"tokenizer": tokenizer, "text_encoder": text_encoder, "unet": unet, "vae": vae}
    for name in ("text_encoder", "unet", "vae"):
        parts[name].eval().requires_grad_(False)
    return parts
