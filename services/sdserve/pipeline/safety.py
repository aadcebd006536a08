"""The safety checker: diffusers' `StableDiffusionSafetyChecker` over decoded images.

What `StableDiffusionPipeline.run_safety_checker` does after the VAE, as a part of its own:

1. the decoded images as PIL images (the VAE decoder's uint8 pixels are exactly the images
   diffusers' `VaeImageProcessor.postprocess(..., output_type="pil")` makes);
2. `feature_extractor(images, return_tensors="pt")`: CLIPImageProcessor resizes the shortest
   side to 224, centre-crops 224x224 and normalizes, so a batch may mix image sizes;
3. the checker's forward in its dtype: CLIP's vision tower and projection, then the cosine of
   each image embedding to 17 concept embeddings and 3 "special care" ones, each compared with
   its threshold (the weights `concept_embeds_weights`, `special_care_embeds_weights`); an
   image is NSFW when any concept score, rounded to 3 decimals, is above 0.

The flags come from the checker's own forward, so they are diffusers' to the last rounding.
`apply` then either leaves the pixels alone ("flag") or replaces each flagged image by a black
one of the same size ("block"), as diffusers returns it.

The layout, beside a model's other parts (SD 1.x/2.x checkpoints ship it):

    safety_checker/     config.json (a CLIPConfig) + model.safetensors
    feature_extractor/  preprocessor_config.json (a CLIPImageProcessor)
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from PIL import Image

from sdserve.constants import CHECKER_DIR, FEATURE_EXTRACTOR_DIR
from sdserve.errors import ModelFolderError
from sdserve.pipeline import models
from sdserve.pipeline.precision import resolve_dtype

SAFETY_MODES = ("flag", "block")
"""What `SafetyChecker.apply` does with a flagged image: mark it, or replace it by black."""

CHECKER_WEIGHTS = ("model.safetensors", "model.fp16.safetensors")
"""The checker's safetensors weights files (the second is a float16 variant)."""

Images = np.ndarray | Sequence[np.ndarray] | Sequence[Image.Image]
"""What the checker takes: uint8 pixels (N, H, W, 3), a list of (H, W, 3) uint8 arrays of any
sizes, or a list of PIL images."""


class Checked(NamedTuple):
    """`SafetyChecker.apply`'s result: the images (in the form given, black where blocked) and
    one NSFW flag per image."""

    images: Images
    nsfw: list[bool]


class SafetyChecker:
    """Loads a model folder's `safety_checker/` and `feature_extractor/` (or the two folders
    given) on `device` in `dtype` ("auto": `precision.resolve_dtype`'s choice)."""

    def __init__(
        self,
        model_dir: str | Path | None = None,
        device: str = "auto",
        dtype: str = "auto",
        *,
        checker_dir: str | Path | None = None,
        feature_extractor_dir: str | Path | None = None,
        allow_pickle: bool = False,
    ):
        checker_dir, extractor_dir = _folders(model_dir, checker_dir, feature_extractor_dir)
        self.device = models.resolve_device(device)
        self.dtype = resolve_dtype(dtype, self.device)
        self.model = load_checker(checker_dir, self.device, self.dtype, allow_pickle=allow_pickle)
        self.feature_extractor = load_feature_extractor(extractor_dir)

    @classmethod
    def from_parts(cls, model, feature_extractor) -> SafetyChecker:
        """Wraps an already-loaded StableDiffusionSafetyChecker and CLIPImageProcessor."""
        checker = cls.__new__(cls)
        checker.model, checker.feature_extractor = model, feature_extractor
        checker.device, checker.dtype = model.device, model.dtype
        return checker

    @torch.no_grad()
    def calibration_forward(self, rows: int = 1) -> None:
        """Checks `rows` grey 64x64 images (for timing)."""
        self.check(np.full((rows, 64, 64, 3), 128, np.uint8))

    @torch.no_grad()
    def check(self, images: Images) -> list[bool]:
        """One NSFW flag per image, as `StableDiffusionPipeline.run_safety_checker` computes
        `nsfw_content_detected` for the same pixels. Images of different sizes share one
        forward (the feature extractor brings each to the vision tower's size)."""
        pil = to_pil(images)
        if not pil:
            return []
        pixels = self.feature_extractor(pil, return_tensors="pt").pixel_values
        clip_input = pixels.to(self.device).to(self.dtype)
        # The forward blackens its `images` argument in place: hand it placeholders and keep
        # only the flags (blocking is `apply`'s, in the caller's image form).
        placeholders = [np.zeros(0) for _ in pil]
        _, nsfw = self.model(clip_input=clip_input, images=placeholders)
        return [bool(flag) for flag in nsfw]

    def apply(self, images: Images, mode: str) -> Checked:
        """Checks `images`; "flag" returns them unchanged, "block" replaces each flagged image
        by a black one of its size (a new array or list; the input is not modified)."""
        if mode not in SAFETY_MODES:
            raise ValueError(f"unknown safety mode {mode!r}; expected one of {SAFETY_MODES}")
        nsfw = self.check(images)
        if mode == "flag" or not any(nsfw):
            return Checked(images, nsfw)
        return Checked(blacken(images, nsfw), nsfw)


def to_pil(images: Images) -> list[Image.Image]:
    """The images as RGB PIL images (uint8 arrays wrapped as they are, with no rescaling)."""
    out = []
    for image in images:
        if isinstance(image, Image.Image):
            out.append(image.convert("RGB"))
            continue
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] != 3:
            raise ValueError(
                f"expected uint8 images of shape (H, W, 3), got {image.dtype} {image.shape}"
            )
        out.append(Image.fromarray(image))
    return out


def blacken(images: Images, nsfw: Sequence[bool]) -> Images:
    """A copy of `images` with each flagged image black (zeros of its shape, or a black PIL
    image of its size and mode)."""
    if isinstance(images, np.ndarray):
        out = images.copy()
        out[np.asarray(nsfw, dtype=bool)] = 0
        return out
    return [_black(image) if flagged else image
            for image, flagged in zip(images, nsfw, strict=True)]  # fmt: skip


def _black(image: np.ndarray | Image.Image) -> np.ndarray | Image.Image:
    if isinstance(image, Image.Image):
        return Image.new(image.mode, image.size)
    return np.zeros_like(image)


def _folders(model_dir, checker_dir, extractor_dir) -> tuple[Path, Path]:
    """The checker's and the feature extractor's folders: those given, else the model
    folder's `safety_checker/` and `feature_extractor/`."""
    if model_dir is None and (checker_dir is None or extractor_dir is None):
        raise ValueError("give a model folder, or both checker_dir and feature_extractor_dir")
    root = Path(model_dir).expanduser() if model_dir is not None else None
    checker = Path(checker_dir).expanduser() if checker_dir else root / CHECKER_DIR
    extractor = Path(extractor_dir).expanduser() if extractor_dir else root / FEATURE_EXTRACTOR_DIR
    return checker, extractor


def check_checker_dir(folder: Path, *, allow_pickle: bool = False) -> str | None:
    """Checks that `folder` holds a checker config and safetensors weights (or pickled ones,
    with `allow_pickle`); returns the weights' variant for from_pretrained ("fp16" when only
    the float16 file is there, else None).

    Raises:
        ModelFolderError: naming the folder and what is missing, or the pickled file.
    """
    if not (folder / "config.json").is_file():
        raise ModelFolderError(f"safety checker folder {folder}: missing config.json")
    if (folder / CHECKER_WEIGHTS[0]).is_file():
        return None
    if (folder / CHECKER_WEIGHTS[1]).is_file():
        return "fp16"
    pickled = sorted(f for f in folder.glob("*") if f.suffix in models.PICKLE_SUFFIXES)
    if pickled and allow_pickle:
        return None
    if pickled:
        raise ModelFolderError(
            f"safety checker folder {folder}: {pickled[0].name} holds pickled weights, which "
            "sdserve does not load (unpickling runs code from the file). Convert it to "
            "safetensors, or, if you trust it, allow pickled weights for this model"
        )
    raise ModelFolderError(f"safety checker folder {folder}: missing {CHECKER_WEIGHTS[0]}")


def load_checker(folder: Path, device: torch.device, dtype: torch.dtype, *,
                 allow_pickle: bool = False):  # fmt: skip
    """A StableDiffusionSafetyChecker from `folder`, on `device` in `dtype`, frozen."""
    from diffusers.pipelines.stable_diffusion.safety_checker import (
        StableDiffusionSafetyChecker,
    )

    variant = check_checker_dir(folder, allow_pickle=allow_pickle)
    model = StableDiffusionSafetyChecker.from_pretrained(
        folder,
        dtype=dtype,
        local_files_only=True,
        variant=variant,
        use_safetensors=None if allow_pickle else True,
    )
    return model.to(device).eval().requires_grad_(False)


def load_feature_extractor(folder: Path):
    """The CLIPImageProcessor in `folder` (its preprocessor_config.json)."""
    from transformers import CLIPImageProcessor

    if not (folder / "preprocessor_config.json").is_file():
        raise ModelFolderError(
            f"feature extractor folder {folder}: missing preprocessor_config.json"
        )
    return CLIPImageProcessor.from_pretrained(folder, local_files_only=True)
