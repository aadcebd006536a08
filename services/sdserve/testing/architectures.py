"""Architectures of random-weight Stable Diffusion models, and building their parts in memory.

Most presets have SD 1.x's structure (CLIP text encoder, UNet2DConditionModel with
cross-attention down/up blocks, AutoencoderKL); they differ in width and depth:

- `tiny`: a 2-level U-Net at width 32, a few milliseconds per step on a CPU (the tests' model);
- `tiny-sd15-layout`: SD 1.5's 4-level block structure at a narrow width, where per-forward
  overhead dominates on a CPU, as it does on a GPU at SD sizes;
- `tiny-inpaint`: `tiny` with a 9-channel U-Net input (latents, mask, masked-image latents),
  the layout of SD's inpainting models;
- `tiny-sd2`: SD 2.x's shape at `tiny`'s width: an OpenCLIP-style text encoder (`gelu`), linear
  attention projections, SD 2.1's v-prediction DDIM scheduler config;
- `tiny-sdxl`: SDXL's shape at a narrow width, as diffusers' own SDXL tests build it: two text
  encoders (the second with a projection), a U-Net with `text_time` added conditioning and
  deeper transformers lower down, SDXL's VAE scaling and Euler scheduler config;
- `sd15`: Stable Diffusion 1.5's own sizes (U-Net 859.52 M, VAE 83.65 M and text encoder
  123.06 M parameters), for benchmarks;
- `sdxl`: SDXL base 1.0's own sizes (U-Net about 2.57 B, text encoders 123 M and 695 M), for
  benchmarks.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from sdserve.pipeline.models import (
    SD15_SCHEDULER,
    SD21_SCHEDULER,
    SDXL_SCHEDULER,
    byte_level_vocab,
)

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
TINY_SD2_TEXT_ENCODER = dict(TINY_TEXT_ENCODER, hidden_act="gelu")  # OpenCLIP's activation
TINY_SD2_UNET = dict(
    TINY_UNET,
    attention_head_dim=(2, 4),  # heads per level, as SD 2.x's (5, 10, 20, 20)
    use_linear_projection=True,
    upcast_attention=True,  # as SD 2.1 (768, v-prediction)
)
TINY_SDXL_TEXT_ENCODER_2 = dict(TINY_TEXT_ENCODER, hidden_act="gelu")  # bigG's shape, tiny
TINY_SDXL_UNET = dict(
    sample_size=8,  # 8x8 latents -> 64x64 pixels
    in_channels=4,
    out_channels=4,
    layers_per_block=2,
    block_out_channels=(32, 64),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
    attention_head_dim=(2, 4),
    use_linear_projection=True,
    addition_embed_type="text_time",
    addition_time_embed_dim=8,
    transformer_layers_per_block=(1, 2),
    projection_class_embeddings_input_dim=80,  # 6 size numbers x 8 + the pooled 32
    cross_attention_dim=64,  # both text encoders' 32 side by side
    # Several channels per group, as in SD (10 at 320 wide): with one channel per group the
    # resnets' GroupNorm would cancel the (per-channel) time and added embedding.
    norm_num_groups=8,
)
TINY_SDXL_VAE = dict(TINY_VAE, scaling_factor=0.13025, force_upcast=True)
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

SDXL_TEXT_ENCODER = dict(SD15_TEXT_ENCODER)  # CLIP ViT-L/14, as SD 1.5's
SDXL_TEXT_ENCODER_2 = dict(  # OpenCLIP ViT-bigG/14's text tower, with its projection
    hidden_size=1280,
    intermediate_size=5120,
    num_attention_heads=20,
    num_hidden_layers=32,
    max_position_embeddings=77,
    hidden_act="gelu",
    projection_dim=1280,
)
SDXL_UNET = dict(
    sample_size=128,
    in_channels=4,
    out_channels=4,
    layers_per_block=2,
    block_out_channels=(320, 640, 1280),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    attention_head_dim=(5, 10, 20),
    use_linear_projection=True,
    addition_embed_type="text_time",
    addition_time_embed_dim=256,
    transformer_layers_per_block=(1, 2, 10),
    projection_class_embeddings_input_dim=2816,  # 6 x 256 + 1280
    cross_attention_dim=2048,  # 768 + 1280
)
SDXL_VAE = dict(SD15_VAE, sample_size=1024, scaling_factor=0.13025, force_upcast=True)


@dataclass(frozen=True)
class Architecture:
    """The configs of one model's parts (keyword arguments of their diffusers or transformers
    classes), and its scheduler config."""

    text_encoder: dict[str, Any]
    unet: dict[str, Any]
    vae: dict[str, Any]
    vocab_size: int | None = None
    """The text encoder's vocabulary; None: the byte-level vocabulary's 514 tokens."""
    text_encoder_2: dict[str, Any] | None = None
    """SDXL: the second text encoder (a CLIPTextModelWithProjection); None for SD 1.x/2.x."""
    scheduler: dict[str, Any] = field(default_factory=lambda: dict(SD15_SCHEDULER))
    """The folder's `scheduler/scheduler_config.json`."""
    pad_token: str | None = None
    """The tokenizer's padding token (None: CLIP's "<|endoftext|>"; SD 2.x pads with "!")."""


ARCHS = {
    "tiny": Architecture(TINY_TEXT_ENCODER, TINY_UNET, TINY_VAE),
    "tiny-sd15-layout": Architecture(TINY_TEXT_ENCODER, TINY_UNET_SD15_LAYOUT, TINY_VAE),
    "tiny-inpaint": Architecture(TINY_TEXT_ENCODER, dict(TINY_UNET, in_channels=9), TINY_VAE),
    "tiny-sd2": Architecture(
        TINY_SD2_TEXT_ENCODER, TINY_SD2_UNET, TINY_VAE, scheduler=SD21_SCHEDULER, pad_token="!"
    ),
    "tiny-sdxl": Architecture(
        TINY_TEXT_ENCODER,
        TINY_SDXL_UNET,
        TINY_SDXL_VAE,
        text_encoder_2=TINY_SDXL_TEXT_ENCODER_2,
        scheduler=SDXL_SCHEDULER,
    ),
    # SD 1.5's CLIP has 49408 tokens; a byte-level tokenizer uses the first 514.
    "sd15": Architecture(SD15_TEXT_ENCODER, SD15_UNET, SD15_VAE, vocab_size=49408),
    "sdxl": Architecture(
        SDXL_TEXT_ENCODER,
        SDXL_UNET,
        SDXL_VAE,
        vocab_size=49408,
        text_encoder_2=SDXL_TEXT_ENCODER_2,
        scheduler=SDXL_SCHEDULER,
    ),
}
"""The presets by name (`sdserve make-tiny-model --arch`, the benchmarks' `--arch`)."""


def byte_level_tokenizer(pad_token: str | None = None):
    """A CLIPTokenizer over `byte_level_vocab()` with no merges (one token per character),
    padding with `pad_token` (None: "<|endoftext|>")."""
    from transformers import CLIPTokenizer

    # model_max_length: a hand-made CLIPTokenizer needs it given explicitly.
    pad = {"pad_token": pad_token} if pad_token else {}
    return CLIPTokenizer(vocab=byte_level_vocab(), merges=[], model_max_length=77, **pad)


def _text_encoder(config: dict[str, Any], spec: Architecture, tokenizer, projection: bool):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    vocab = tokenizer.get_vocab()
    token_ids = {
        "vocab_size": spec.vocab_size or len(vocab),
        "bos_token_id": vocab["<|startoftext|>"],
        "eos_token_id": vocab["<|endoftext|>"],
        "pad_token_id": vocab[tokenizer.pad_token],
    }
    model_cls = CLIPTextModelWithProjection if projection else CLIPTextModel
    return model_cls(CLIPTextConfig(**config, **token_ids))


def random_parts(arch: str, seed: int = 0) -> dict[str, Any]:
    """The parts of preset `arch` with seeded random weights, as
    {"tokenizer", "text_encoder", "unet", "vae"}, and for SDXL also {"tokenizer_2",
    "text_encoder_2"} (float32, on the CPU)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    spec = ARCHS[arch]
    tokenizer = byte_level_tokenizer(spec.pad_token)
    torch.manual_seed(seed)
    text_encoder = _text_encoder(spec.text_encoder, spec, tokenizer, projection=False)
    torch.manual_seed(seed + 1)
    unet = UNet2DConditionModel(**spec.unet)
    torch.manual_seed(seed + 2)
    vae = AutoencoderKL(**spec.vae)
    parts = {"tokenizer": tokenizer, "text_encoder": text_encoder, "unet": unet, "vae": vae}
    if spec.text_encoder_2 is not None:
        parts["tokenizer_2"] = byte_level_tokenizer("!")  # SDXL's second tokenizer pads with "!"
        torch.manual_seed(seed + 3)
        parts["text_encoder_2"] = _text_encoder(spec.text_encoder_2, spec, parts["tokenizer_2"],
                                                projection=True)  # fmt: skip
    for name, part in parts.items():
        if not name.startswith("tokenizer"):
            part.eval().requires_grad_(False)
    return parts
