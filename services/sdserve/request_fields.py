"""Validation of the request fields that tune a generation beyond its size and sampler: the
cheaper-step knobs and the LoRA adapters. INVALID_ARGUMENT names the field."""

from __future__ import annotations

import math

from sdserve.config import LimitsConfig
from sdserve.errors import InvalidArgument
from sdserve.pipeline.lora_files import NAME as LORA_NAME


def check_cheaper_steps(request, limits: LimitsConfig) -> dict:
    """guidance_stop (0 < f <= 1) and cache_interval (1..limits.max_cache_interval)."""
    fields = {}
    if request.HasField("guidance_stop"):
        stop = round(request.guidance_stop, 6)  # a float32: 0.4 arrives as 0.40000001
        if not (math.isfinite(stop) and 0 < stop <= 1):
            raise InvalidArgument("guidance_stop", f"must be within (0, 1], got {stop:g}")
        fields["guidance_stop"] = stop
    if request.HasField("cache_interval"):
        n = request.cache_interval
        if not 1 <= n <= limits.max_cache_interval:
            raise InvalidArgument(
                "cache_interval", f"must be within 1..{limits.max_cache_interval}, got {n}"
            )
        fields["cache_interval"] = n
    return fields


def check_loras(request, limits: LimitsConfig) -> tuple[tuple[str, float], ...]:
    """(name, scale) of each adapter: at most `limits.max_loras_per_request`, names as adapter
    files are named, each once, scales finite within the limits (unset: 1)."""
    if len(request.loras) > limits.max_loras_per_request:
        raise InvalidArgument("loras", f"at most {limits.max_loras_per_request} adapters per "
                              f"request, got {len(request.loras)}")  # fmt: skip
    out: list[tuple[str, float]] = []
    for i, lora in enumerate(request.loras):
        if not LORA_NAME.match(lora.name):
            raise InvalidArgument(f"loras[{i}].name", f"{lora.name!r} is not an adapter name")
        if any(name == lora.name for name, _ in out):
            raise InvalidArgument(f"loras[{i}].name", f"adapter {lora.name!r} is given twice")
        scale = round(lora.scale, 6) if lora.HasField("scale") else 1.0  # float32 -> as sent
        if not (math.isfinite(scale) and limits.min_lora_scale <= scale <= limits.max_lora_scale):
            raise InvalidArgument(f"loras[{i}].scale", f"adapter {lora.name!r}: scale must be "
                                  f"within {limits.min_lora_scale:g}..{limits.max_lora_scale:g}, "
                                  f"got {scale:g}")  # fmt: skip
        out.append((lora.name, scale))
    return tuple(out)
