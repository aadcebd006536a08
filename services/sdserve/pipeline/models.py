"""Loading the parts of a diffusers-format Stable Diffusion folder, each on its own (and writing
one, for the tiny test models and the default model's training).

The layout SD 1.x/2.x ship (and `sdserve make-tiny-model` writes):

    model_index.json
    tokenizer/      vocab.json + merges.txt (or tokenizer.json)
    text_encoder/   config.json + model.safetensors
    unet/           config.json + diffusion_pytorch_model.safetensors
    vae/            config.json + diffusion_pytorch_model.safetensors
    scheduler/      scheduler_config.json

Each stage loads only its own part. Nothing is fetched from a hub: every loader gets a local path
and `local_files_only=True`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from sdserve.errors import ModelFolderError

PARTS: dict[str, tuple[tuple[str, ...], ...]] = {
    # part -> alternatives, each a tuple of files that must all exist
    "tokenizer": (("vocab.json", "merges.txt"), ("tokenizer.json",)),
    "text_encoder": (
        ("config.json", "model.safetensors"),
        ("config.json", "model.fp16.safetensors"),
    ),
    "unet": (
        ("config.json", "diffusion_pytorch_model.safetensors"),
        ("config.json", "diffusion_pytorch_model.fp16.safetensors"),
    ),
    "vae": (
        ("config.json", "diffusion_pytorch_model.safetensors"),
        ("config.json", "diffusion_pytorch_model.fp16.safetensors"),
    ),
    "scheduler": (("scheduler_config.json",),),
}
"""What each part of a model folder needs, as alternatives of file sets."""


def check_model_dir(path: str | Path, parts: tuple[str, ...]) -> Path:
    """Checks that `path` is a diffusers model folder holding `parts`; returns it resolved.

    Raises:
        ModelFolderError: naming the folder and every missing file.
    """
    root = Path(path).expanduser()
    if not root.is_dir():
        raise ModelFolderError(f"model folder {root} does not exist or is not a folder")
    missing = [] if (root / "model_index.json").is_file() else ["model_index.json"]
    for part in parts:
        alternatives = PARTS[part]
        if any(all((root / part / f).is_file() for f in files) for files in alternatives):
            continue
        first = alternatives[0]
        missing += [f"{part}/{f}" for f in first if not (root / part / f).is_file()]
    if missing:
        raise ModelFolderError(
            f"{root} is not a valid diffusers model folder: missing {', '.join(missing)}"
        )
    return root.resolve()


def resolve_device(device: str = "auto") -> torch.device:
    """auto: CUDA when this process sees a GPU, else CPU."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(device)


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """auto: float16 on CUDA, float32 on CPU (fp16 matmuls on CPU are slow and inexact)."""
    if dtype == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    return getattr(torch, dtype)


def _variant(root: Path, part: str, weights: str) -> str | None:
    """Loads the fp16 variant only when it is the only weights file present."""
    if (root / part / weights).is_file():
        return None
    return "fp16"


def load_tokenizer(root: Path):
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(root / "tokenizer", local_files_only=True)


def load_text_encoder(root: Path, device: torch.device, dtype: torch.dtype):
    from transformers import CLIPTextModel

    model = CLIPTextModel.from_pretrained(
        root / "text_encoder",
        dtype=dtype,
        local_files_only=True,
        variant=_variant(root, "text_encoder", "model.safetensors"),
    )
    return model.to(device).eval().requires_grad_(False)


def _load_diffusers_part(model_cls, root: Path, part: str, device, dtype):
    model = model_cls.from_pretrained(
        root / part,
        torch_dtype=dtype,
        local_files_only=True,
        variant=_variant(root, part, "diffusion_pytorch_model.safetensors"),
    )
    return model.to(device).eval().requires_grad_(False)


def load_unet(root: Path, device: torch.device, dtype: torch.dtype):
    from diffusers import UNet2DConditionModel

    return _load_diffusers_part(UNet2DConditionModel, root, "unet", device, dtype)


def load_vae(root: Path, device: torch.device, dtype: torch.dtype):
    from diffusers import AutoencoderKL

    return _load_diffusers_part(AutoencoderKL, root, "vae", device, dtype)


def load_scheduler_config(root: Path) -> dict[str, Any]:
    """The folder's scheduler config (the `scheduler/scheduler_config.json` mapping)."""
    return json.loads((root / "scheduler" / "scheduler_config.json").read_text())


def vae_scale_factor(vae_config: dict[str, Any]) -> int:
    """Pixels per latent cell along each side: 2 ** (number of VAE blocks - 1), 8 for SD."""
    return 2 ** (len(vae_config["block_out_channels"]) - 1)


def read_config(root: Path, part: str) -> dict[str, Any]:
    """A part's config.json, without loading weights."""
    path = root / part / "config.json"
    if not path.is_file():
        raise ModelFolderError(
            f"{root} is not a valid diffusers model folder: missing {part}/config.json"
        )
    return json.loads(path.read_text())


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
"""Stable Diffusion 1.5's `scheduler/scheduler_config.json`, verbatim."""


# --- Writing a folder (the tiny test models, the default model's training) -----------------


def byte_level_vocab() -> dict[str, int]:
    """A CLIP BPE vocabulary of the 256 byte symbols (plain and word-final), used with no merges.

    Every text tokenizes (one token per character), which is all a random-weight model needs.
    """
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    symbols = list(bytes_to_unicode().values())
    tokens = ["<|startoftext|>", "<|endoftext|>"] + symbols + [s + "</w>" for s in symbols]
    return {tok: i for i, tok in enumerate(tokens)}


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
