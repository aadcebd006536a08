"""Validation of a generation request, for both edges (gRPC and HTTP) and the job queue:
`GenerateFields` as the client sent them -> `GenerateParams`, defaults filled in, or
InvalidArgument naming the first invalid field.

The image inputs (image-to-image, inpainting) are decoded fully here, so that a bad image is
refused with INVALID_ARGUMENT naming its field before any stage sees it; the VaeEncoder decodes
them again (`sdserve.pipeline.images`). What depends on the served model (its adapters, an SDXL
or inpainting U-Net) is `StagePath.validate`'s to check.
"""

from __future__ import annotations

import asyncio
import io
import math
import secrets
from dataclasses import dataclass

from sdserve.api.types import ControlFields, ControlParams, GenerateFields, GenerateParams
from sdserve.config import DefaultsConfig, LimitsConfig
from sdserve.constants import MAX_SEQUENCE_LENGTH, SCHEDULER_NAMES
from sdserve.errors import InvalidArgument
from sdserve.pipeline.control_images import CANNY_HIGH, CANNY_LOW, PREPROCESSORS
from sdserve.pipeline.lora_files import NAME as LORA_NAME

INIT_FORMATS = ("PNG", "JPEG")
MASK_FORMATS = ("PNG",)


def validate_fields(
    fields: GenerateFields,
    *,
    limits: LimitsConfig,
    defaults: DefaultsConfig,
    native_size: tuple[int, int],
    model: str = "",
) -> GenerateParams:
    """Validates a request against the configured limits, for `model` (the served model it
    names, checked by the caller, whose native size and defaults are given).

    Raises:
        InvalidArgument: naming the first invalid field.
    """
    _check_prompts(fields, limits)
    images = check_image_inputs(fields, limits)
    size = _checked_size(fields, limits, images.size if images else native_size, images)
    steps = fields.steps if fields.steps is not None else defaults.steps
    if not 1 <= steps <= limits.max_steps:
        raise InvalidArgument("steps", f"must be within 1..{limits.max_steps}, got {steps}")
    guidance = fields.guidance_scale
    if guidance is None:
        guidance = defaults.guidance_scale
    if not math.isfinite(guidance) or guidance < 0:
        raise InvalidArgument("guidance_scale", f"must be finite and >= 0, got {guidance}")
    scheduler = fields.scheduler or defaults.scheduler
    if scheduler not in SCHEDULER_NAMES:
        raise InvalidArgument(
            "scheduler",
            f"unknown scheduler {scheduler!r}; choose one of {', '.join(SCHEDULER_NAMES)}",
        )
    num_images = fields.num_images if fields.num_images is not None else 1
    if not 1 <= num_images <= limits.max_num_images:
        raise InvalidArgument(
            "num_images", f"must be within 1..{limits.max_num_images}, got {num_images}"
        )
    seed = fields.seed if fields.seed is not None else secrets.randbelow(2**32)
    image_fields = {}
    if images:
        strength = check_strength(fields, defaults.strength, steps)
        image_fields = dict(init_image=images.init_image, mask_image=images.mask_image,
                            strength=strength)  # fmt: skip
    image_fields.update(check_cheaper_steps(fields, limits))
    image_fields.update(check_transformer_fields(fields))
    if fields.loras:
        image_fields["loras"] = check_loras(fields, limits)
    if fields.controls:
        image_fields["controls"] = check_controls(fields.controls, limits)
    return GenerateParams(
        prompt=fields.prompt,
        negative_prompt=fields.negative_prompt,
        width=size["width"],
        height=size["height"],
        steps=steps,
        guidance_scale=float(guidance),
        scheduler=scheduler,
        seed=seed,
        num_images=num_images,
        model=model,
        **image_fields,
    )


async def validate_fields_async(fields: GenerateFields, **kwargs) -> GenerateParams:
    """`validate_fields` for a caller on an event loop: a request with image inputs is checked
    on a worker thread, since decoding a large PNG or JPEG takes tens of milliseconds that would
    stall every other request on the loop."""
    if not (fields.init_image or fields.mask_image or fields.controls):
        return validate_fields(fields, **kwargs)
    return await asyncio.to_thread(validate_fields, fields, **kwargs)


def _check_prompts(fields: GenerateFields, limits: LimitsConfig) -> None:
    if not fields.prompt.strip():
        raise InvalidArgument("prompt", "must not be empty")
    for name in ("prompt", "negative_prompt"):
        n = len(getattr(fields, name))
        if n > limits.max_prompt_chars:
            raise InvalidArgument(
                name, f"is {n} characters long; the limit is {limits.max_prompt_chars}"
            )


def _checked_size(
    fields: GenerateFields, limits: LimitsConfig, default: tuple[int, int], images
) -> dict:
    """{"width": w, "height": h}: the request's, or `default` (the init image's size, or the
    model's native one) for unset fields. An init image fixes the size."""
    size = {}
    for name, fallback in zip(("width", "height"), default, strict=True):
        value = getattr(fields, name)
        value = fallback if value is None else value
        if images and value != fallback:
            w, h = images.size
            raise InvalidArgument(name, f"is {value}, but init_image is {w}x{h}")
        if value % 8:
            raise InvalidArgument(name, f"must be a multiple of 8, got {value}")
        if not limits.min_size <= value <= limits.max_size:
            raise InvalidArgument(
                name, f"must be within {limits.min_size}..{limits.max_size}, got {value}"
            )
        size[name] = value
    if size["width"] * size["height"] > limits.max_pixels:
        raise InvalidArgument(
            "width",
            f"width * height = {size['width'] * size['height']} pixels is over the budget "
            f"of {limits.max_pixels}",
        )
    return size


# --- The fields that tune a generation beyond its size and sampler --------------------------


def check_cheaper_steps(fields: GenerateFields, limits: LimitsConfig) -> dict:
    """guidance_stop (0 < f <= 1) and cache_interval (1..limits.max_cache_interval)."""
    out = {}
    if fields.guidance_stop is not None:
        stop = round(fields.guidance_stop, 6)  # a float32: 0.4 arrives as 0.40000001
        if not (math.isfinite(stop) and 0 < stop <= 1):
            raise InvalidArgument("guidance_stop", f"must be within (0, 1], got {stop:g}")
        out["guidance_stop"] = stop
    if fields.cache_interval is not None:
        n = fields.cache_interval
        if not 1 <= n <= limits.max_cache_interval:
            raise InvalidArgument(
                "cache_interval", f"must be within 1..{limits.max_cache_interval}, got {n}"
            )
        out["cache_interval"] = n
    return out


def check_transformer_fields(fields: GenerateFields) -> dict:
    """The diffusion transformers' fields, where set, within the bounds any model would take:
    max_sequence_length 1..MAX_SEQUENCE_LENGTH, true_cfg_scale >= 0, shift > 0 (finite). Which
    family takes which is `StagePath.validate`'s to check (`orchestration.families`)."""
    out: dict = {}
    if fields.max_sequence_length is not None:
        n = fields.max_sequence_length
        if not 1 <= n <= MAX_SEQUENCE_LENGTH:
            raise InvalidArgument("max_sequence_length",
                                  f"must be within 1..{MAX_SEQUENCE_LENGTH}, got {n}")  # fmt: skip
        out["max_sequence_length"] = n
    if fields.true_cfg_scale is not None:
        scale = _as_sent(fields.true_cfg_scale, 1.0)
        if not (math.isfinite(scale) and scale >= 0):
            raise InvalidArgument("true_cfg_scale", f"must be finite and >= 0, got {scale:g}")
        out["true_cfg_scale"] = scale
    if fields.shift is not None:
        shift = _as_sent(fields.shift, 0.0)
        if not (math.isfinite(shift) and shift > 0):
            raise InvalidArgument("shift", f"must be finite and > 0, got {shift:g}")
        out["shift"] = shift
    return out


def check_loras(fields: GenerateFields, limits: LimitsConfig) -> tuple[tuple[str, float], ...]:
    """(name, scale) of each adapter: at most `limits.max_loras_per_request`, names as adapter
    files are named, each once, scales finite within the limits (unset: 1)."""
    if len(fields.loras) > limits.max_loras_per_request:
        raise InvalidArgument("loras", f"at most {limits.max_loras_per_request} adapters per "
                              f"request, got {len(fields.loras)}")  # fmt: skip
    out: list[tuple[str, float]] = []
    for i, (name, scale) in enumerate(fields.loras):
        if not LORA_NAME.match(name):
            raise InvalidArgument(f"loras[{i}].name", f"{name!r} is not an adapter name")
        if any(seen == name for seen, _ in out):
            raise InvalidArgument(f"loras[{i}].name", f"adapter {name!r} is given twice")
        scale = round(scale, 6) if scale is not None else 1.0  # float32 -> as sent
        if not (math.isfinite(scale) and limits.min_lora_scale <= scale <= limits.max_lora_scale):
            raise InvalidArgument(f"loras[{i}].scale", f"adapter {name!r}: scale must be "
                                  f"within {limits.min_lora_scale:g}..{limits.max_lora_scale:g}, "
                                  f"got {scale:g}")  # fmt: skip
        out.append((name, scale))
    return tuple(out)


def check_controls(controls: tuple[ControlFields, ...],
                   limits: LimitsConfig) -> tuple[ControlParams, ...]:  # fmt: skip
    """Each ControlNet entry checked, defaults filled in: at most `limits.max_controls`, a
    ControlNet name, a decodable image within the limits, a scale within the limits, a window
    0 <= start < end <= 1, a known preprocessor and its thresholds. Whether the model has the
    net is `StagePath.validate`'s to check."""
    if len(controls) > limits.max_controls:
        raise InvalidArgument("controls", f"at most {limits.max_controls} ControlNets per "
                              f"request, got {len(controls)}")  # fmt: skip
    return tuple(_check_control(f"controls[{i}]", c, limits) for i, c in enumerate(controls))


def _check_control(at: str, control: ControlFields, limits: LimitsConfig) -> ControlParams:
    if not LORA_NAME.match(control.name):
        raise InvalidArgument(f"{at}.name", f"{control.name!r} is not a ControlNet name")
    if not control.image:
        raise InvalidArgument(f"{at}.image", "is required (the control image, PNG or JPEG)")
    if len(control.image) > limits.max_image_bytes:
        raise InvalidArgument(f"{at}.image", f"is {len(control.image)} bytes, over "
                              f"limits.max_image_bytes = {limits.max_image_bytes}")  # fmt: skip
    _decoded_size(f"{at}.image", control.image, INIT_FORMATS, limits)
    scale = _as_sent(control.scale, 1.0)
    if not (math.isfinite(scale) and limits.min_control_scale <= scale <= limits.max_control_scale):
        raise InvalidArgument(f"{at}.scale", f"must be within {limits.min_control_scale:g}.."
                              f"{limits.max_control_scale:g}, got {scale:g}")  # fmt: skip
    start, end = _as_sent(control.start, 0.0), _as_sent(control.end, 1.0)
    if not (math.isfinite(start) and 0 <= start < 1):
        raise InvalidArgument(f"{at}.start", f"must be within [0, 1), got {start:g}")
    if not (math.isfinite(end) and start < end <= 1):
        raise InvalidArgument(f"{at}.end", f"must be within (start, 1] = ({start:g}, 1], "
                              f"got {end:g}")  # fmt: skip
    if control.preprocess not in PREPROCESSORS:
        raise InvalidArgument(f"{at}.preprocess", f"unknown preprocessor "
                              f"{control.preprocess!r}; choose \"\" or \"canny\"")  # fmt: skip
    low, high = _as_sent(control.canny_low, CANNY_LOW), _as_sent(control.canny_high, CANNY_HIGH)
    for name, value in (("canny_low", low), ("canny_high", high)):
        if not (math.isfinite(value) and 0 <= value <= 1000):
            raise InvalidArgument(f"{at}.{name}", f"must be within 0..1000, got {value:g}")
    if low > high:
        raise InvalidArgument(f"{at}.canny_low", f"{low:g} is above canny_high {high:g}")
    return ControlParams(control.name, control.image, scale, start, end, control.guess_mode,
                         control.preprocess, low, high)  # fmt: skip


def _as_sent(value: float | None, default: float) -> float:
    """A float32 field as the client wrote it (six decimals), or `default` when unset."""
    return float(round(value, 6)) if value is not None else default


# --- Image inputs ---------------------------------------------------------------------------


@dataclass(frozen=True)
class ImageInputs:
    """A request's checked image inputs."""

    init_image: bytes
    mask_image: bytes
    size: tuple[int, int]
    """(width, height) of the init image (and mask)."""


def _decoded_size(field: str, data: bytes, formats: tuple[str, ...], limits: LimitsConfig):
    """Decodes the image fully (so a truncated one fails here) and returns (width, height),
    within the pixel budget (any side: a control image is resized to the output size)."""
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
    return width, height


def _image_size(field: str, data: bytes, formats: tuple[str, ...], limits: LimitsConfig):
    """`_decoded_size`, each side a multiple of 8 within the size limits (an init image)."""
    width, height = _decoded_size(field, data, formats, limits)
    for side, value in (("width", width), ("height", height)):
        if value % 8 or not limits.min_size <= value <= limits.max_size:
            raise InvalidArgument(
                field, f"its {side} must be a multiple of 8 within "
                f"{limits.min_size}..{limits.max_size}, got {value}",
            )  # fmt: skip
    return width, height


def check_image_inputs(fields: GenerateFields, limits: LimitsConfig) -> ImageInputs | None:
    """The request's init image and mask, checked; None for text-to-image.

    Raises:
        InvalidArgument: an undecodable image, a wrong format, an image over the pixel budget,
            a mask without an init image or of another size, or a strength without an image.
    """
    if not fields.init_image:
        if fields.mask_image:
            raise InvalidArgument("mask_image", "needs init_image (the image to inpaint)")
        if fields.strength is not None:
            raise InvalidArgument("strength", "applies only with init_image")
        return None
    for name in ("init_image", "mask_image"):  # before decoding: an image's cost is its size
        if len(getattr(fields, name)) > limits.max_image_bytes:
            raise InvalidArgument(name, f"is {len(getattr(fields, name))} bytes, over "
                                  f"limits.max_image_bytes = {limits.max_image_bytes}")  # fmt: skip
    size = _image_size("init_image", fields.init_image, INIT_FORMATS, limits)
    if fields.mask_image:
        mask_size = _image_size("mask_image", fields.mask_image, MASK_FORMATS, limits)
        if mask_size != size:
            raise InvalidArgument(
                "mask_image",
                f"is {mask_size[0]}x{mask_size[1]}; init_image is {size[0]}x{size[1]}",
            )
    return ImageInputs(fields.init_image, fields.mask_image, size)


def check_strength(fields: GenerateFields, default: float, steps: int) -> float:
    """The request's strength (default when unset): 0 < strength <= 1, and at least one step."""
    # The field is a float32: 0.7 arrives as 0.69999999, and int(10 * that) would run 6 steps
    # where diffusers, given 0.7, runs 7. Six decimals recover what the client meant.
    strength = round(fields.strength, 6) if fields.strength is not None else default
    if not (math.isfinite(strength) and 0 < strength <= 1):
        raise InvalidArgument("strength", f"must be within (0, 1], got {strength:g}")
    if int(steps * strength) < 1:
        raise InvalidArgument(
            "strength", f"{strength:g} of {steps} steps runs no step; raise steps or strength"
        )
    return float(strength)
