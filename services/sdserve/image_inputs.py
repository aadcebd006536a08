"""Validation of a request's image inputs (image-to-image, inpainting) at the gRPC edge.

Only the images' headers are trusted after a full decode here, so that a bad image is refused
with INVALID_ARGUMENT naming its field before any stage sees it. The VaeEncoder decodes them
again (`sdserve.pipeline.images`).
"""

from __future__ import annotations

import io
from dataclasses import dataclass

from sdserve.config import LimitsConfig
from sdserve.errors import InvalidArgument

INIT_FORMATS = ("PNG", "JPEG")
MASK_FORMATS = ("PNG",)


@dataclass(frozen=True)
class ImageInputs:
    """A request's checked image inputs."""

    init_image: bytes
    mask_image: bytes
    size: tuple[int, int]
    """(width, height) of the init image (and mask)."""


def _image_size(field: str, data: bytes, formats: tuple[str, ...], limits: LimitsConfig):
    """Decodes the image fully (so a truncated one fails here) and returns (width, height)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as image:
            fmt, size = image.format, image.size
            if fmt in formats and size[0] * size[1] <= limits.max_pixels:
                image.load()
    except Exception as exc:  # PIL raises many kinds; the client only needs the field
        reason = "not an image format" if isinstance(exc, UnidentifiedImageError) else exc
        raise InvalidArgument(
            field, f"cannot be decoded as {' or '.join(formats)}: {reason}"
        ) from exc
    if fmt not in formats:
        raise InvalidArgument(field, f"must be {' or '.join(formats)}, got {fmt}")
    width, height = size
    if width * height > limits.max_pixels:
        raise InvalidArgument(
            field, f"{width}x{height} = {width * height} pixels is over the budget of "
            f"{limits.max_pixels}",
        )  # fmt: skip
    for side, value in (("width", width), ("height", height)):
        if value % 8 or not limits.min_size <= value <= limits.max_size:
            raise InvalidArgument(
                field, f"its {side} must be a multiple of 8 within "
                f"{limits.min_size}..{limits.max_size}, got {value}",
            )  # fmt: skip
    return width, height


def check_image_inputs(request, limits: LimitsConfig) -> ImageInputs | None:
    """The request's init image and mask, checked; None for text-to-image.

    Raises:
        InvalidArgument: an undecodable image, a wrong format, an image over the pixel budget,
            a mask without an init image or of another size, or a strength without an image.
    """
    if not request.init_image:
        if request.mask_image:
            raise InvalidArgument("mask_image", "needs init_image (the image to inpaint)")
        if request.HasField("strength"):
            raise InvalidArgument("strength", "applies only with init_image")
        return None
    size = _image_size("init_image", request.init_image, INIT_FORMATS, limits)
    if request.mask_image:
        mask_size = _image_size("mask_image", request.mask_image, MASK_FORMATS, limits)
        if mask_size != size:
            raise InvalidArgument(
                "mask_image",
                f"is {mask_size[0]}x{mask_size[1]}; init_image is {size[0]}x{size[1]}",
            )
    return ImageInputs(request.init_image, request.mask_image, size)


def check_strength(request, default: float, steps: int) -> float:
    """The request's strength (default when unset): 0 < strength <= 1, and at least one step."""
    import math

    # The field is a float32: 0.7 arrives as 0.69999999, and int(10 * that) would run 6 steps
    # where diffusers, given 0.7, runs 7. Six decimals recover what the client meant.
    strength = round(request.strength, 6) if request.HasField("strength") else default
    if not (math.isfinite(strength) and 0 < strength <= 1):
        raise InvalidArgument("strength", f"must be within (0, 1], got {strength:g}")
    if int(steps * strength) < 1:
        raise InvalidArgument(
            "strength", f"{strength:g} of {steps} steps runs no step; raise steps or strength"
        )
    return float(strength)
