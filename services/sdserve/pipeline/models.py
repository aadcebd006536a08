"""Loading the parts of a diffusers-format Stable Diffusion folder, each on its own (and writing
one, for the tiny test models and the default model's training).

The layout SD 1.x/2.x ship (and `sdserve make-tiny-model` writes):

    model_index.json
    tokenizer/      vocab.json + merges.txt (or tokenizer.json)
    text_encoder/   config.json + model.safetensors
    unet/           config.json + diffusion_pytorch_model.safetensors
    vae/            config.json + diffusion_pytorch_model.safetensors
    scheduler/      scheduler_config.json

SDXL adds `tokenizer_2/` and `text_encoder_2/` (OpenCLIP bigG, a CLIPTextModelWithProjection).
The diffusion transformers have `transformer/` instead of `unet/` and a T5 encoder: SD3 (CLIP-L,
CLIP-G, `tokenizer_3/` + `text_encoder_3/` T5) and FLUX (CLIP-L, `tokenizer_2/` +
`text_encoder_2/` T5), with a FlowMatchEulerDiscreteScheduler. `model_family` tells the five
apart from the config files alone.

Each stage loads only its own part. Nothing is fetched from a hub: every loader gets a local path
and `local_files_only=True`. Weights load from safetensors only: a pickled file (`.bin`, `.pt`)
runs code of its author's when it is loaded, so a part that has only one is refused, naming it,
unless the model's config entry sets `allow_pickle: true`.
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
        ("config.json", "model.safetensors.index.json"),  # sharded (T5-XXL)
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
"""What each part of an SD 1.x/2.x folder needs, as alternatives of file sets."""

XL_PARTS: dict[str, tuple[tuple[str, ...], ...]] = {
    "tokenizer_2": PARTS["tokenizer"],
    "text_encoder_2": PARTS["text_encoder"],
}
"""The parts an SDXL folder has besides `PARTS`."""

DIT_PARTS: dict[str, tuple[tuple[str, ...], ...]] = {
    "transformer": (
        ("config.json", "diffusion_pytorch_model.safetensors"),
        ("config.json", "diffusion_pytorch_model.safetensors.index.json"),  # sharded
    ),
    "tokenizer_3": PARTS["tokenizer"],
    "text_encoder_3": PARTS["text_encoder"],
}
"""The diffusion transformers' denoiser, and SD3's third text encoder (T5)."""

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")
"""Weights files that are Python pickles (torch.load): loading one can run any code."""

FAMILIES = ("sd1", "sd2", "sdxl", "sd3", "flux")
"""Model families (`model_family`): SD 1.x, SD 2.x (OpenCLIP, often v-prediction), SDXL, and
the flow-matching diffusion transformers SD 3/3.5 and FLUX.1."""

DIT_FAMILIES = ("sd3", "flux")
"""The families whose denoiser is a transformer (`transformer/`), not a U-Net."""

TRANSFORMER_FAMILIES = {"SD3Transformer2DModel": "sd3", "FluxTransformer2DModel": "flux"}
"""`transformer/config.json`'s `_class_name` -> family."""


def check_model_dir(path: str | Path, parts: tuple[str, ...], *, allow_pickle: bool = False
                    ) -> Path:  # fmt: skip
    """Checks that `path` is a diffusers model folder holding `parts`, with safetensors weights
    (or pickled ones, with `allow_pickle`); returns it resolved.

    Raises:
        ModelFolderError: naming the folder and every missing file, or the pickled weights
            file of a part that has no safetensors one.
    """
    root = Path(path).expanduser()
    if not root.is_dir():
        raise ModelFolderError(f"model folder {root} does not exist or is not a folder")
    missing = [] if (root / "model_index.json").is_file() else ["model_index.json"]
    for part in parts:
        alternatives = {**PARTS, **XL_PARTS, **DIT_PARTS}[part]
        if any(all((root / part / f).is_file() for f in files) for files in alternatives):
            continue
        pickled = sorted(f for f in (root / part).glob("*") if f.suffix in PICKLE_SUFFIXES)
        if pickled and not allow_pickle:
            raise ModelFolderError(
                f"{root}: {part}/{pickled[0].name} holds pickled weights, which sdserve does "
                "not load (unpickling runs code from the file). Convert it to safetensors, or, "
                "if you trust it, set allow_pickle: true in this model's config entry"
            )
        first = alternatives[0]
        needed = [f for f in first if not (pickled and f.endswith(".safetensors"))]
        missing += [f"{part}/{f}" for f in needed if not (root / part / f).is_file()]
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


def _variant(root: Path, part: str, weights: str) -> str | None:
    """Loads the fp16 variant only when it is the only safetensors weights file present."""
    fp16 = weights.replace(".safetensors", ".fp16.safetensors")
    if (root / part / weights).is_file() or not (root / part / fp16).is_file():
        return None
    return "fp16"


def _safetensors(allow_pickle: bool) -> bool | None:
    """`use_safetensors` for from_pretrained: True refuses a pickled file even where a
    safetensors one is missing; None (allowed) still prefers safetensors."""
    return None if allow_pickle else True


def load_tokenizer(root: Path, part: str = "tokenizer"):
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(root / part, local_files_only=True)


def load_t5(root: Path, part: str, device: torch.device, dtype: torch.dtype, *,
            allow_pickle: bool = False):  # fmt: skip
    """A T5 encoder and its tokenizer (SD3's `text_encoder_3/`, FLUX's `text_encoder_2/`):
    (T5TokenizerFast, T5EncoderModel)."""
    from transformers import T5EncoderModel, T5TokenizerFast

    tokenizer = T5TokenizerFast.from_pretrained(root / part.replace("text_encoder", "tokenizer"),
                                                local_files_only=True)  # fmt: skip
    model = T5EncoderModel.from_pretrained(
        root / part, dtype=dtype, local_files_only=True, use_safetensors=_safetensors(allow_pickle)
    )
    return tokenizer, model.to(device).eval().requires_grad_(False)


def load_text_encoder(
    root: Path,
    device: torch.device,
    dtype: torch.dtype,
    part: str = "text_encoder",
    *,
    allow_pickle: bool = False,
    projection: bool | None = None,
):
    """`text_encoder/` as a CLIPTextModel; SDXL's `text_encoder_2/` as a
    CLIPTextModelWithProjection (its pooled, projected output conditions the U-Net);
    `projection` True or False decides it instead of the part's name (SD3's two CLIPs)."""
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    if projection is None:
        projection = part == "text_encoder_2"
    model_cls = CLIPTextModelWithProjection if projection else CLIPTextModel
    model = model_cls.from_pretrained(
        root / part,
        dtype=dtype,
        local_files_only=True,
        variant=_variant(root, part, "model.safetensors"),
        use_safetensors=_safetensors(allow_pickle),
    )
    return model.to(device).eval().requires_grad_(False)


def load_part(model_cls, root: Path, part: str, device, dtype, allow_pickle: bool):
    """A diffusers model class's folder `root / part`, on `device` in `dtype`, frozen."""
    model = model_cls.from_pretrained(
        root / part,
        torch_dtype=dtype,
        local_files_only=True,
        variant=_variant(root, part, "diffusion_pytorch_model.safetensors"),
        use_safetensors=_safetensors(allow_pickle),
    )
    return model.to(device).eval().requires_grad_(False)


def load_unet(root: Path, device: torch.device, dtype: torch.dtype, *, allow_pickle: bool = False):
    from diffusers import UNet2DConditionModel

    return load_part(UNet2DConditionModel, root, "unet", device, dtype, allow_pickle)


def load_vae(root: Path, device: torch.device, dtype: torch.dtype, *, allow_pickle: bool = False):
    from diffusers import AutoencoderKL

    return load_part(AutoencoderKL, root, "vae", device, dtype, allow_pickle)


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


def _json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.is_file() else {}


def read_index(root: Path) -> dict[str, Any]:
    """The folder's model_index.json ({} when it has none)."""
    return _json(Path(root) / "model_index.json")


def config_family(unet_config: dict[str, Any], text_config: dict[str, Any] | None = None) -> str:
    """The family ("sdxl", "sd2" or "sd1") of a U-Net config (and the first text encoder's).

    SDXL's U-Net takes the pooled text and size conditioning (`addition_embed_type`
    "text_time"); SD 2.x's cross-attends to OpenCLIP-H (1024 wide, `gelu`), SD 1.x's to CLIP-L
    (768, `quick_gelu`)."""
    if unet_config.get("addition_embed_type") == "text_time":
        return "sdxl"
    if unet_config.get("cross_attention_dim") == 1024:
        return "sd2"
    if (text_config or {}).get("hidden_act") == "gelu":
        return "sd2"
    return "sd1"


def model_family(root: str | Path) -> str:
    """The family of the model folder at `root` ("sd1", "sd2", "sdxl", "sd3" or "flux"), read
    from its config files only (model_index.json, unet/ or transformer/, and text_encoder/
    config.json)."""
    root = Path(root)
    transformer = _json(root / "transformer" / "config.json").get("_class_name", "")
    if transformer:
        if transformer not in TRANSFORMER_FAMILIES:
            raise ModelFolderError(
                f"{root}: transformer/ is a {transformer}; sdserve serves "
                f"{', '.join(TRANSFORMER_FAMILIES)} transformers"
            )
        return TRANSFORMER_FAMILIES[transformer]
    if "XL" in read_index(root).get("_class_name", ""):
        return "sdxl"
    unet = _json(root / "unet" / "config.json")
    return config_family(unet, _json(root / "text_encoder" / "config.json"))


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

SD21_SCHEDULER = dict(
    _class_name="DDIMScheduler",
    _diffusers_version="0.8.0",
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    clip_sample=False,
    num_train_timesteps=1000,
    prediction_type="v_prediction",
    set_alpha_to_one=False,
    skip_prk_steps=True,
    steps_offset=1,
    trained_betas=None,
)
"""Stable Diffusion 2.1's (768x768, v-prediction) `scheduler/scheduler_config.json`, verbatim."""

SDXL_SCHEDULER = dict(
    _class_name="EulerDiscreteScheduler",
    _diffusers_version="0.19.0.dev0",
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    clip_sample=False,
    interpolation_type="linear",
    num_train_timesteps=1000,
    prediction_type="epsilon",
    sample_max_value=1.0,
    set_alpha_to_one=False,
    skip_prk_steps=True,
    steps_offset=1,
    timestep_spacing="leading",
    trained_betas=None,
    use_karras_sigmas=False,
)
"""SDXL base 1.0's `scheduler/scheduler_config.json`, verbatim."""


# --- Writing a folder (the tiny test models, the default model's training) -----------------


def byte_level_vocab() -> dict[str, int]:
    """A CLIP BPE vocabulary of the 256 byte symbols (plain and word-final), used with no merges.

    Every text tokenizes (one token per character), which is all a random-weight model needs.
    """
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    symbols = list(bytes_to_unicode().values())
    tokens = ["<|startoftext|>", "<|endoftext|>"] + symbols + [s + "</w>" for s in symbols]
    return {tok: i for i, tok in enumerate(tokens)}


def scheduler_from_config(config: dict[str, Any]):
    """The scheduler a folder's config names (`_class_name`), built from that config."""
    import diffusers

    return getattr(diffusers, config["_class_name"]).from_config(config)


def sd_pipeline(vae, text_encoder, tokenizer, unet, scheduler_config=SD15_SCHEDULER):
    """A StableDiffusionPipeline of these parts, with SD 1.5's scheduler (or the one
    `scheduler_config` names) and no safety checker."""
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler_from_config(scheduler_config),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def sdxl_pipeline(parts: dict[str, Any], scheduler_config=SDXL_SCHEDULER):
    """A StableDiffusionXLPipeline of `parts` (vae, text_encoder, text_encoder_2, tokenizer,
    tokenizer_2, unet), with SDXL's scheduler and no watermarker."""
    from diffusers import StableDiffusionXLPipeline

    names = ("vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "unet")
    return StableDiffusionXLPipeline(
        **{name: parts[name] for name in names},
        scheduler=scheduler_from_config(scheduler_config),
        force_zeros_for_empty_prompt=True,
        add_watermarker=False,
    )


def save_sd_folder(pipe, out: Path, scheduler_config=SD15_SCHEDULER) -> None:
    """`pipe.save_pretrained(out)` with safetensors, keeping the scheduler config verbatim
    (save_pretrained rewrites it; SD 1.5's carries keys PNDM ignores but DDIM reads)."""
    pipe.save_pretrained(out, safe_serialization=True)
    (out / "scheduler" / "scheduler_config.json").write_text(
        json.dumps(scheduler_config, indent=2) + "\n"
    )
