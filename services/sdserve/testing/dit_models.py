"""Random-weight diffusion transformers (SD 3.x's MMDiT, FLUX.1's), built in memory or written
as diffusers folders (`sdserve make-tiny-model --arch tiny-sd3 | tiny-flux`).

The presets (`DIT_ARCHS`):

- `tiny-sd3`: Stable Diffusion 3.5 Medium's structure at a tiny width, a folder that
  `diffusers.StableDiffusion3Pipeline.from_pretrained(folder)` loads: two CLIP text encoders with
  projections (32 wide each, `quick_gelu` and `gelu`, byte-level tokenizers, the second padding
  with "!"), a T5 encoder (`tiny_t5_tokenizer`: one token per ASCII character, 98 in all; d_model
  64, gated-gelu), an SD3Transformer2DModel (2 layers, 4 heads of 8, the first with SD 3.5's dual
  attention, RMS-normed q/k, patch 2, positions up to 32 patches a side), a 16-channel
  AutoencoderKL with four blocks (latents 8x smaller per side) and SD 3.5 Medium's scheduler
  config. Native size 64x64 pixels; any multiple of 16 up to 512 works.
- `tiny-flux`: FLUX.1-dev's structure at a tiny width, a folder that
  `diffusers.FluxPipeline.from_pretrained(folder)` loads: one CLIP text encoder (32 wide, its
  pooled output conditions the transformer), the same T5 encoder, a FluxTransformer2DModel (1
  double-stream and 2 single-stream blocks, 2 heads of 16, guidance-distilled as FLUX.1-dev), a
  16-channel VAE with FLUX's scaling and FLUX.1-dev's scheduler config (dynamic shifting).
  Native size 64x64 pixels (sides must be multiples of 16); FluxPipeline's default is 1024x1024
  whatever the model (its `default_sample_size` is fixed), so pass `height` and `width`.
- `sd3.5-medium` and `flux-dev`: the real models' sizes, for GPU benchmarks; never written as a
  folder. Counted on the meta device (`parameter_counts`): SD 3.5 Medium's transformer 2,243.2 M
  parameters (its state dict, the checkpoint, holds 2,469.7 M: the 384 x 384 position table,
  a persistent buffer, adds 226.5 M), CLIP-L with projection 123.7 M, CLIP-G 694.7 M;
  FLUX.1-dev's transformer 11,901.4 M, its CLIP-L 123.1 M; T5-XXL's encoder 4,762.3 M and
  each VAE 83.8 M.

Like `architectures.random_parts`, the parts make noise, not pictures; each is seeded on its own
(`torch.manual_seed(seed + k)`), so the same seed gives byte-identical weight files.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from sdserve.pipeline.models import save_sd_folder, scheduler_from_config
from sdserve.testing.architectures import (
    SDXL_TEXT_ENCODER,
    SDXL_TEXT_ENCODER_2,
    TINY_SDXL_TEXT_ENCODER_2,
    TINY_TEXT_ENCODER,
    TINY_VAE,
    _text_encoder,
    byte_level_tokenizer,
)

SD3_SCHEDULER = {
    "_class_name": "FlowMatchEulerDiscreteScheduler",
    "_diffusers_version": "0.31.0.dev0",
    "num_train_timesteps": 1000,
    "shift": 3.0,
}
"""Stable Diffusion 3.5 Medium's `scheduler/scheduler_config.json`, verbatim."""

FLUX_SCHEDULER = {
    "_class_name": "FlowMatchEulerDiscreteScheduler",
    "_diffusers_version": "0.30.0.dev0",
    "base_image_seq_len": 256,
    "base_shift": 0.5,
    "max_image_seq_len": 4096,
    "max_shift": 1.15,
    "num_train_timesteps": 1000,
    "shift": 3.0,
    "use_dynamic_shifting": True,
}
"""FLUX.1-dev's `scheduler/scheduler_config.json`, verbatim."""

TINY_T5 = dict(
    d_model=64,
    d_ff=64,
    d_kv=16,
    num_heads=4,
    num_layers=2,
    feed_forward_proj="gated-gelu",  # T5 v1.1's, as SD3's and FLUX's T5-XXL
    relative_attention_num_buckets=8,
    relative_attention_max_distance=32,
)
T5_XXL = dict(  # google/t5-v1_1-xxl's encoder, as SD3 and FLUX ship it
    TINY_T5,
    d_model=4096,
    d_ff=10240,
    d_kv=64,
    num_heads=64,
    num_layers=24,
    relative_attention_num_buckets=32,
    relative_attention_max_distance=128,
)
TINY_SD3_TRANSFORMER = dict(
    sample_size=8,  # 8x8 latents -> 64x64 pixels
    patch_size=2,
    in_channels=16,
    out_channels=16,
    num_layers=2,
    attention_head_dim=8,
    num_attention_heads=4,
    joint_attention_dim=64,  # T5's d_model; the CLIP states (32 + 32) are padded to it
    caption_projection_dim=32,  # the width, 4 x 8
    pooled_projection_dim=64,  # both CLIP projections side by side
    pos_embed_max_size=32,  # up to 32 patches a side: 512x512 pixels
    dual_attention_layers=(0,),  # SD 3.5's MMDiT-X, in the first layer as in SD 3.5 Medium
    qk_norm="rms_norm",
)
SD35_MEDIUM_TRANSFORMER = dict(
    sample_size=128,
    patch_size=2,
    in_channels=16,
    out_channels=16,
    num_layers=24,
    attention_head_dim=64,
    num_attention_heads=24,
    joint_attention_dim=4096,
    caption_projection_dim=1536,
    pooled_projection_dim=2048,  # 768 + 1280
    pos_embed_max_size=384,
    dual_attention_layers=tuple(range(13)),
    qk_norm="rms_norm",
)
TINY_FLUX_TRANSFORMER = dict(
    patch_size=1,
    in_channels=64,  # 16 latent channels, each 2x2 patch packed into one token
    num_layers=1,
    num_single_layers=2,
    attention_head_dim=16,
    num_attention_heads=2,
    joint_attention_dim=64,  # T5's d_model
    pooled_projection_dim=32,  # CLIP's hidden size (its pooled output)
    guidance_embeds=True,  # guidance-distilled, as FLUX.1-dev
    axes_dims_rope=(4, 6, 6),  # sums to attention_head_dim
)
FLUX_DEV_TRANSFORMER = dict(
    TINY_FLUX_TRANSFORMER,
    num_layers=19,
    num_single_layers=38,
    attention_head_dim=128,
    num_attention_heads=24,
    joint_attention_dim=4096,
    pooled_projection_dim=768,
    axes_dims_rope=(16, 56, 56),
)
TINY_DIT_VAE = dict(
    TINY_VAE,
    block_out_channels=(16, 16, 32, 32),
    latent_channels=16,
    norm_num_groups=8,
    use_quant_conv=False,
    use_post_quant_conv=False,
)
"""The tiny VAE with SD3's and FLUX's 16 latent channels and no quant convolutions (the
scaling and shift come per family: `SD3_LATENTS`, `FLUX_LATENTS`)."""
DIT_VAE = dict(TINY_DIT_VAE, block_out_channels=(128, 256, 512, 512), layers_per_block=2,
               norm_num_groups=32, sample_size=1024)  # fmt: skip
SD3_LATENTS = dict(scaling_factor=1.5305, shift_factor=0.0609)
FLUX_LATENTS = dict(scaling_factor=0.3611, shift_factor=0.1159)


@dataclass(frozen=True)
class DitArchitecture:
    """The configs of one diffusion transformer model's parts (keyword arguments of their
    diffusers or transformers classes), and its pipeline and scheduler config."""

    pipeline: str
    """The diffusers pipeline class: "StableDiffusion3Pipeline" or "FluxPipeline"."""
    family: str
    """The model family, as the README names it."""
    text_encoder: dict[str, Any]
    """CLIP-L: a CLIPTextModelWithProjection for SD3, a CLIPTextModel for FLUX."""
    transformer: dict[str, Any]
    vae: dict[str, Any]
    t5: dict[str, Any]
    """The T5 encoder's T5Config (its vocabulary: the tokenizer's, where the config has none)."""
    scheduler: dict[str, Any]
    """The folder's `scheduler/scheduler_config.json`."""
    text_encoder_2: dict[str, Any] | None = None
    """SD3's CLIP-G (a CLIPTextModelWithProjection); None for FLUX."""
    vocab_size: int | None = None
    """The CLIP encoders' vocabulary; None: the byte-level vocabulary's 514 tokens."""


SD3_PIPELINE, FLUX_PIPELINE = "StableDiffusion3Pipeline", "FluxPipeline"
DIT_ARCHS = {
    "tiny-sd3": DitArchitecture(
        SD3_PIPELINE, "Stable Diffusion 3.5", TINY_TEXT_ENCODER, TINY_SD3_TRANSFORMER,
        dict(TINY_DIT_VAE, **SD3_LATENTS), TINY_T5, SD3_SCHEDULER,
        text_encoder_2=TINY_SDXL_TEXT_ENCODER_2,
    ),
    "tiny-flux": DitArchitecture(
        FLUX_PIPELINE, "FLUX.1", TINY_TEXT_ENCODER, TINY_FLUX_TRANSFORMER,
        dict(TINY_DIT_VAE, **FLUX_LATENTS), TINY_T5, FLUX_SCHEDULER,
    ),
    "sd3.5-medium": DitArchitecture(
        SD3_PIPELINE, "Stable Diffusion 3.5", SDXL_TEXT_ENCODER, SD35_MEDIUM_TRANSFORMER,
        dict(DIT_VAE, **SD3_LATENTS), dict(T5_XXL, vocab_size=32128), SD3_SCHEDULER,
        text_encoder_2=SDXL_TEXT_ENCODER_2, vocab_size=49408,
    ),
    "flux-dev": DitArchitecture(
        FLUX_PIPELINE, "FLUX.1", SDXL_TEXT_ENCODER, FLUX_DEV_TRANSFORMER,
        dict(DIT_VAE, **FLUX_LATENTS), dict(T5_XXL, vocab_size=32128), FLUX_SCHEDULER,
        vocab_size=49408,
    ),
}  # fmt: skip
"""The diffusion transformer presets by name (`tiny-*`: `make_tiny_model`'s; the others the
real models' sizes, for benchmarks)."""

TINY_DIT_ARCHS = ("tiny-sd3", "tiny-flux")
"""The presets `make_tiny_model` writes."""


def tiny_t5_tokenizer(model_max_length: int = 512):
    """A T5TokenizerFast (a Unigram model, T5's "▁" word starts) with one token per printable
    ASCII character: "<pad>" 0, "</s>" 1 (appended to every text), "<unk>" 2 (for any other
    character), "▁" 3, then "!" to "~"; no sentinel (`<extra_id_N>`) tokens.

    It is built from its vocabulary, as `T5TokenizerFast.from_pretrained` rebuilds it from a
    saved `tokenizer.json`: transformers 5 keeps only the vocabulary of that file, so a
    normalizer or byte fallback of a hand-made `tokenizers.Tokenizer` would not survive a reload.
    """
    from transformers import T5TokenizerFast

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    pieces += [(chr(code), -3.0) for code in range(ord("!"), ord("~") + 1)]
    return T5TokenizerFast(vocab=pieces, extra_ids=0, model_max_length=model_max_length)


def _t5_encoder(config: dict[str, Any], tokenizer):
    from transformers import T5Config, T5EncoderModel

    vocab = {"vocab_size": len(tokenizer), **config}
    ids = {"pad_token_id": tokenizer.pad_token_id, "eos_token_id": tokenizer.eos_token_id}
    return T5EncoderModel(T5Config(**vocab, **ids, decoder_start_token_id=tokenizer.pad_token_id))


def dit_parts(arch: str, seed: int = 0, device: str | torch.device = "cpu",
              dtype: torch.dtype = torch.float32) -> dict[str, Any]:  # fmt: skip
    """The parts of preset `arch` with seeded random weights, by the pipeline's component names:
    {"tokenizer", "text_encoder", "tokenizer_2", "text_encoder_2", "tokenizer_3",
    "text_encoder_3", "transformer", "vae"} for SD3, {"tokenizer", "text_encoder",
    "tokenizer_2", "text_encoder_2", "transformer", "vae"} for FLUX (T5 is the second).

    Each part is built under `torch.device(device)` in float32 (so its random initialization
    runs there), then cast to `dtype`, one part after another. At full size pass a CUDA
    device: the peak is a part in float32 plus the ones built before it in `dtype`, about
    48 GB for `flux-dev` (its transformer) in bfloat16; on a CPU that much RAM and minutes of
    initialization. On the meta device nothing is allocated, which is how the parameter counts
    are taken (`parameter_counts`).
    """
    from diffusers import AutoencoderKL, FluxTransformer2DModel, SD3Transformer2DModel

    spec = DIT_ARCHS[arch]
    sd3 = spec.pipeline == SD3_PIPELINE
    transformer_cls = SD3Transformer2DModel if sd3 else FluxTransformer2DModel
    tokenizers = _tokenizers(spec)
    t5 = "text_encoder_3" if sd3 else "text_encoder_2"
    builders = {  # name -> (seed offset, builder)
        "text_encoder": (0, lambda: _text_encoder(spec.text_encoder, spec,
                                                  tokenizers["tokenizer"], projection=sd3)),
        "transformer": (1, lambda: transformer_cls(**spec.transformer)),
        "vae": (2, lambda: AutoencoderKL(**spec.vae)),
        t5: (4, lambda: _t5_encoder(spec.t5, tokenizers[t5.replace("text_encoder", "tokenizer")])),
    }  # fmt: skip
    if spec.text_encoder_2 is not None:
        clip_g = spec.text_encoder_2
        builders["text_encoder_2"] = (3, lambda: _text_encoder(clip_g, spec,
                                                               tokenizers["tokenizer_2"],
                                                               projection=True))  # fmt: skip
    parts: dict[str, Any] = dict(tokenizers)
    for name, (offset, build) in builders.items():
        torch.manual_seed(seed + offset)
        with torch.device(device):
            part = build()
        if dtype != torch.float32:  # (diffusers warns on any cast, needed or not)
            part = part.to(dtype=dtype)
        parts[name] = part.eval().requires_grad_(False)
    return parts


def _tokenizers(spec: DitArchitecture) -> dict[str, Any]:
    """The tokenizers of `spec`'s pipeline, by component name: byte-level CLIP ones (SD3's
    second pads with "!", as SDXL's) and `tiny_t5_tokenizer`."""
    if spec.pipeline == SD3_PIPELINE:
        return {"tokenizer": byte_level_tokenizer(), "tokenizer_2": byte_level_tokenizer("!"),
                "tokenizer_3": tiny_t5_tokenizer()}  # fmt: skip
    return {"tokenizer": byte_level_tokenizer(), "tokenizer_2": tiny_t5_tokenizer()}


def dit_pipeline(arch: str, parts: dict[str, Any]):
    """The diffusers pipeline of preset `arch` (a StableDiffusion3Pipeline or a FluxPipeline)
    of `parts` (`dit_parts`), with the preset's scheduler."""
    import diffusers

    spec = DIT_ARCHS[arch]
    pipeline_cls = getattr(diffusers, spec.pipeline)
    return pipeline_cls(**parts, scheduler=scheduler_from_config(spec.scheduler))


def parameter_counts(arch: str) -> dict[str, int]:
    """The number of parameters of each part of preset `arch` with weights (by component
    name), counted on the meta device: nothing is allocated, even at full size."""
    parts = dit_parts(arch, device="meta")
    return {name: sum(p.numel() for p in part.parameters())
            for name, part in parts.items() if isinstance(part, torch.nn.Module)}  # fmt: skip


def write_dit_folder(out: Path, seed: int, arch: str) -> str:
    """Writes tiny preset `arch` (one of `TINY_DIT_ARCHS`) as a diffusers folder into the
    existing, empty folder `out`: safetensors weights, `model_index.json` and the scheduler
    config verbatim. Returns the model family, for the README."""
    if arch not in TINY_DIT_ARCHS:
        raise ValueError(f"{arch!r} is not a tiny diffusion transformer; choose one of "
                         f"{TINY_DIT_ARCHS}")  # fmt: skip
    spec = DIT_ARCHS[arch]
    save_sd_folder(dit_pipeline(arch, dit_parts(arch, seed)), out, spec.scheduler)
    return spec.family
