"""OpenAI's Images API in sdserve's terms: a `POST /v1/images/generations` body becomes a
`GenerateRequest` (which the request path validates like any gRPC request), and results, stream
events and errors become the JSON OpenAI's clients expect.

OpenAI's fields: `prompt`, `model`, `n`, `size` ("WxH" or "auto"), `response_format` (`b64_json`,
the default, or `url`), `stream` with `partial_images` (0-3), `user`; `output_format` must be
`png`, and `quality`, `style`, `background`, `moderation` and `output_compression` are accepted
and ignored. sdserve's own fields ride along under their diffusers names (`negative_prompt`,
`num_inference_steps`, `guidance_scale`, `seed`, `scheduler`) or their API names (`strength`,
`init_image` and `mask_image` as base64 PNG/JPEG, `guidance_stop`, `cache_interval`, `loras`
as a list of {"name", "scale"}, `controls` as a list of {"name", "image" (base64), "scale",
"start", "end", "guess_mode", "preprocess", "canny_low", "canny_high"}; for the diffusion
transformers `max_sequence_length`, `true_cfg_scale` and `shift`, as FluxPipeline and
StableDiffusion3Pipeline name them). Anything else is refused, naming the field, rather than
silently dropped.

For a model with a safety checker, each image item (and a stream's completed event) says
`nsfw_content_detected` and `blocked` (`safety_fields`).
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import time
from dataclasses import dataclass
from typing import Any

from sse_starlette import ServerSentEvent

from sdserve.config import LimitsConfig
from sdserve.errors import InvalidArgument
from sdserve.v1 import diffusion_pb2

MAX_PARTIAL_IMAGES = 3
DEFAULT_MAX_IMAGE_BYTES = LimitsConfig().max_image_bytes
IGNORED = frozenset({"quality", "style", "background", "moderation", "output_compression"})
"""OpenAI fields that mean nothing for a diffusion model: accepted, not used."""
NUMBERS = {  # body field -> (GenerateRequest field, type)
    "n": ("num_images", int),
    "num_inference_steps": ("steps", int),
    "guidance_scale": ("guidance_scale", float),
    "seed": ("seed", int),
    "strength": ("strength", float),
    "guidance_stop": ("guidance_stop", float),
    "cache_interval": ("cache_interval", int),
    "max_sequence_length": ("max_sequence_length", int),
    "true_cfg_scale": ("true_cfg_scale", float),
    "shift": ("shift", float),
}
TEXTS = {"prompt": "prompt", "negative_prompt": "negative_prompt", "model": "model",
         "scheduler": "scheduler"}  # fmt: skip
IMAGES = {"init_image": "init_image", "mask_image": "mask_image"}
OWN = {"size", "response_format", "stream", "partial_images", "output_format", "user", "loras",
       "controls", "stream_progress"}  # fmt: skip
CONTROL_FIELDS = {"scale": float, "start": float, "end": float, "canny_low": float,
                  "canny_high": float, "preprocess": str, "guess_mode": bool}  # fmt: skip
"""A `controls` entry's fields besides its name and image (`Control` in diffusion.proto)."""

HTTP_STATUS = {
    "INVALID_ARGUMENT": 400,
    "FAILED_PRECONDITION": 400,
    "OUT_OF_RANGE": 400,
    "UNAUTHENTICATED": 401,
    "PERMISSION_DENIED": 403,
    "NOT_FOUND": 404,
    "RESOURCE_EXHAUSTED": 429,
    "CANCELLED": 499,
    "INTERNAL": 500,
    "UNAVAILABLE": 503,
    "DEADLINE_EXCEEDED": 504,
}
"""The HTTP status of each gRPC status code (500 for the rest)."""
ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error",
               404: "not_found_error", 429: "rate_limit_error"}  # fmt: skip


@dataclass(frozen=True)
class ImagesRequest:
    """A parsed `POST /v1/images/generations` body."""

    request: diffusion_pb2.GenerateRequest
    response_format: str = "b64_json"
    stream: bool = False
    partial_images: int = 0
    user: str = ""
    stream_progress: bool = False
    """sdserve's own: a stream also sends an `image_generation.progress` event per step."""


def parse_generation(body: Any, *, max_image_bytes: int = DEFAULT_MAX_IMAGE_BYTES
                     ) -> ImagesRequest:  # fmt: skip
    """Reads a request body (parsed JSON). Raises InvalidArgument naming the field; a base64
    image that would decode to more than `max_image_bytes` is refused before decoding."""
    if not isinstance(body, dict):
        raise InvalidArgument("body", "must be a JSON object")
    for name in body:
        if name not in TEXTS | NUMBERS | IMAGES | {n: n for n in OWN | IGNORED}:
            raise InvalidArgument(name, "is not a parameter of this API")
    if "prompt" not in body:
        raise InvalidArgument("prompt", "is required")
    request = diffusion_pb2.GenerateRequest()
    for name, field in TEXTS.items():
        if body.get(name) is not None:
            setattr(request, field, _typed(body, name, str))
    for name, (field, kind) in NUMBERS.items():
        if body.get(name) is not None:
            value = _typed(body, name, kind)
            if kind is int and not 0 <= value < 2**64:
                raise InvalidArgument(name, f"must be a non-negative integer, got {value}")
            try:
                setattr(request, field, value)
            except ValueError:  # over a uint32 field's range
                raise InvalidArgument(name, f"is out of range, got {value}") from None
    for name, field in IMAGES.items():
        if body.get(name) is not None:
            setattr(request, field, _image(body, name, max_image_bytes))
    _size(body.get("size"), request)
    _loras(body.get("loras"), request)
    _controls(body.get("controls"), request, max_image_bytes)
    if body.get("output_format", "png") != "png":
        raise InvalidArgument("output_format", "must be png (the only format sdserve writes)")
    response_format = body.get("response_format") or "b64_json"
    if response_format not in ("b64_json", "url"):
        raise InvalidArgument(
            "response_format", f"must be b64_json or url, got {response_format!r}"
        )
    stream = body.get("stream") or False
    if not isinstance(stream, bool):
        raise InvalidArgument("stream", "must be true or false")
    partial = _typed(body, "partial_images", int) if body.get("partial_images") is not None else 0
    if not 0 <= partial <= MAX_PARTIAL_IMAGES:
        raise InvalidArgument("partial_images", f"must be within 0..{MAX_PARTIAL_IMAGES}")
    if stream and request.HasField("num_images") and request.num_images != 1:
        raise InvalidArgument("n", "must be 1 when stream is true")
    user = _typed(body, "user", str) if body.get("user") is not None else ""
    progress = body.get("stream_progress") or False
    if not isinstance(progress, bool):
        raise InvalidArgument("stream_progress", "must be true or false")
    return ImagesRequest(request, response_format, stream, partial, user, progress)


def _typed(body: dict, name: str, kind: type):
    value = body[name]
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, kind) or isinstance(value, bool):
        what = {str: "a string", int: "an integer", float: "a number"}[kind]
        raise InvalidArgument(name, f"must be {what}, got {json.dumps(value)[:40]}")
    if kind is float and not math.isfinite(value):
        raise InvalidArgument(name, "must be finite")
    return value


def _image(body: dict, name: str, max_bytes: int) -> bytes:
    text = _typed(body, name, str)
    if text.startswith("data:"):  # a data URL: data:image/png;base64,....
        text = text.partition(",")[2]
    if len(text) > 4 * math.ceil(max_bytes / 3):  # what max_bytes encode to: no decoding
        raise InvalidArgument(name, f"is over limits.max_image_bytes = {max_bytes} bytes")
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise InvalidArgument(name, "must be base64-encoded PNG or JPEG bytes") from None


def _size(size: Any, request: diffusion_pb2.GenerateRequest) -> None:
    """ "WxH" sets width and height; "auto" or none leaves the model's native size."""
    if size is None or size == "auto":
        return
    width, sep, height = str(size).partition("x")
    if not (isinstance(size, str) and sep and width.isdigit() and height.isdigit()):
        raise InvalidArgument("size", f'must be "WIDTHxHEIGHT" (e.g. "512x512") or "auto", '
                              f"got {json.dumps(size)[:40]}")  # fmt: skip
    request.width, request.height = int(width), int(height)


def _loras(loras: Any, request: diffusion_pb2.GenerateRequest) -> None:
    """`loras`: a list of {"name": ..., "scale": ...} (or of names, at scale 1)."""
    if loras is None:
        return
    if not isinstance(loras, list):
        raise InvalidArgument("loras", 'must be a list of {"name": ..., "scale": ...}')
    for i, lora in enumerate(loras):
        lora = {"name": lora} if isinstance(lora, str) else lora
        if not isinstance(lora, dict) or set(lora) - {"name", "scale"} or "name" not in lora:
            raise InvalidArgument(f"loras[{i}]", 'must be {"name": ..., "scale": ...}')
        weight = request.loras.add(name=_typed(lora, "name", str))
        if lora.get("scale") is not None:
            weight.scale = _typed(lora, "scale", float)


def _controls(controls: Any, request: diffusion_pb2.GenerateRequest, max_bytes: int) -> None:
    """`controls`: a list of {"name": ..., "image": <base64>, "scale": ..., ...}; an error
    names the entry's field (`controls[0].scale`)."""
    if controls is None:
        return
    shape = '{"name": ..., "image": <base64 PNG or JPEG>, ...}'
    if not isinstance(controls, list):
        raise InvalidArgument("controls", f"must be a list of {shape}")
    for i, control in enumerate(controls):
        at = f"controls[{i}]"
        if not isinstance(control, dict) or "name" not in control or "image" not in control:
            raise InvalidArgument(at, f"must be {shape}")
        unknown = sorted(set(control) - {"name", "image", *CONTROL_FIELDS})
        if unknown:
            raise InvalidArgument(f"{at}.{unknown[0]}", f"is not a control field; the fields "
                                  f"are name, image, {', '.join(CONTROL_FIELDS)}")  # fmt: skip
        named = {f"{at}.{k}": v for k, v in control.items() if v is not None}
        entry = request.controls.add(name=_typed(named, f"{at}.name", str),
                                     image=_image(named, f"{at}.image", max_bytes))  # fmt: skip
        for key, kind in CONTROL_FIELDS.items():
            if f"{at}.{key}" not in named:
                continue
            if kind is bool and not isinstance(named[f"{at}.{key}"], bool):
                raise InvalidArgument(f"{at}.{key}", "must be true or false")
            value = named[f"{at}.{key}"] if kind is bool else _typed(named, f"{at}.{key}", kind)
            setattr(entry, key, value)


def generation_body(request: diffusion_pb2.GenerateRequest) -> dict:
    """The body that asks for `request` (the load tester's HTTP mode; the inverse of
    `parse_generation` for the fields a request sets)."""
    body: dict[str, Any] = {"prompt": request.prompt}
    for name, field in TEXTS.items():
        if name != "prompt" and getattr(request, field):
            body[name] = getattr(request, field)
    for name, (field, _) in NUMBERS.items():
        if request.HasField(field):
            body[name] = getattr(request, field)
    for name, field in IMAGES.items():
        if getattr(request, field):
            body[name] = base64.b64encode(getattr(request, field)).decode()
    if request.HasField("width") and request.HasField("height"):
        body["size"] = f"{request.width}x{request.height}"
    if request.loras:
        body["loras"] = [{"name": w.name, **({"scale": w.scale} if w.HasField("scale") else {})}
                         for w in request.loras]  # fmt: skip
    if request.controls:
        body["controls"] = [_control_body(c) for c in request.controls]
    return body


def _control_body(control: diffusion_pb2.Control) -> dict:
    body = {"name": control.name, "image": base64.b64encode(control.image).decode()}
    for key, kind in CONTROL_FIELDS.items():
        if kind is float and control.HasField(key) or kind is not float and getattr(control, key):
            body[key] = getattr(control, key)
    return body


def images_response(pngs: list[bytes] | None, prompt: str, *, urls: list[str] | None = None,
                    size: str = "", extra: dict | None = None, nsfw: tuple[bool, ...] = (),
                    blocked: tuple[bool, ...] = ()) -> dict:  # fmt: skip
    """`{created, data: [{b64_json | url, revised_prompt}], size, output_format}`, plus
    sdserve's own `sdserve` object (request id, seeds, resolved parameters). Where the model
    has a safety checker (`nsfw` given), each item also says `nsfw_content_detected` and
    `blocked` (`safety_fields`)."""
    if urls is not None:
        data = [{"url": url, "revised_prompt": prompt} for url in urls]
    else:
        data = [{"b64_json": base64.b64encode(png).decode(), "revised_prompt": prompt}
                for png in pngs or []]  # fmt: skip
    for i, item in enumerate(data if nsfw else ()):
        item.update(safety_fields(nsfw[i], blocked[i] if blocked else False))
    body = {"created": int(time.time()), "data": data, "size": size, "output_format": "png"}
    if extra:
        body["sdserve"] = extra
    return body


def safety_fields(nsfw: bool, blocked: bool) -> dict:
    """What an image item (or a stream's completed event) says of a checked image:
    `nsfw_content_detected` (diffusers' name: the model's safety checker flagged it) and
    `blocked` (it was replaced by a black image, `safety: block`)."""
    return {"nsfw_content_detected": nsfw, "blocked": blocked}


def progress_event(step: int, total: int) -> ServerSentEvent:
    """sdserve's own `image_generation.progress` event (with `stream_progress`): a step done."""
    event = {"type": "image_generation.progress", "step": step, "total_steps": total}
    return ServerSentEvent(json.dumps(event), event=event["type"])


def stream_event(kind: str, png: bytes, *, size: str, index: int | None = None,
                 safety: dict | None = None, extra: dict | None = None
                 ) -> ServerSentEvent:  # fmt: skip
    """One server-sent event as OpenAI sends them: `image_generation.partial_image` (with its
    `partial_image_index`) or `image_generation.completed` (with `safety_fields` where the
    model has a safety checker, and `extra`: sdserve's `seed` and `request_id`), its JSON as
    the `data:` line."""
    event = {
        "type": f"image_generation.{kind}",
        "b64_json": base64.b64encode(png).decode(),
        "created_at": int(time.time()),
        "size": size,
        "quality": "auto",
        "background": "opaque",
        "output_format": "png",
    }
    if index is not None:
        event["partial_image_index"] = index
    event.update(safety or {})
    event.update(extra or {})
    return ServerSentEvent(json.dumps(event), event=event["type"])


BODY_NAMES = {field: name for name, (field, _) in NUMBERS.items()} | {
    "width": "size", "height": "size"
}  # fmt: skip
"""The body field of each GenerateRequest field that is named differently."""


def error_body(code: str, message: str, field: str | None = None) -> tuple[int, dict]:
    """(HTTP status, OpenAI's error JSON) for a gRPC status code name, its message and the
    invalid field (named as in the body: `n`, `size`, ...)."""
    status = HTTP_STATUS.get(code, 500)
    param = BODY_NAMES.get(field, field) if field else None
    error = {"message": message, "type": ERROR_TYPES.get(status, "server_error"),
             "param": param, "code": code.lower()}  # fmt: skip
    return status, {"error": error}


def error_event(code: str, message: str, field: str | None = None) -> ServerSentEvent:
    """An error in the middle of a stream, an `error` event with OpenAI's error JSON (OpenAI's
    clients raise it as an APIError)."""
    _, body = error_body(code, message, field)
    return ServerSentEvent(json.dumps(body), event="error")
