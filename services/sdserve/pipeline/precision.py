"""Which dtype each stage computes in: what `dtype: auto` means on each device.

- CUDA: float16, as diffusers' users run SD (SDXL's VAE still decodes in float32 where diffusers
  upcasts it, `sdserve.pipeline.vae`).
- A CPU whose oneDNN runs bfloat16 matmuls and convolutions natively (AMX tiles or
  avx512_bf16; `cpu_has_bf16_matmul`): bfloat16 for every stage. Measured on this project's
  machines (`bench/bench_roofline.py`): a 2048^2 matmul runs 2.3x (Zen 4, avx512_bf16) to 9.9x
  (Sapphire Rapids, AMX) faster than in float32, SD 1.5's U-Net 1.8x to 4x, its VAE decoder
  2.0x, its text encoder 2.4x.
- Any other CPU: float32 (bfloat16 and float16 are emulated there, and slow).

Whatever the weights' dtype, the denoising loop keeps the latents and the scheduler's arithmetic
in float32 (`sdserve.pipeline.step` casts a forward's input to the U-Net's dtype and its output
back), so that rounding does not pile up over the steps.
"""

from __future__ import annotations

import functools
import logging

import torch

logger = logging.getLogger(__name__)

DTYPES = ("auto", "float32", "float16", "bfloat16")
"""The values of a model's `dtype` setting."""


@functools.cache
def cpu_has_bf16_matmul() -> bool:
    """Whether this CPU runs bfloat16 matmuls and convolutions in hardware (oneDNN's check for
    avx512_bf16 or AMX, as torch reports it)."""
    if not torch.backends.mkldnn.is_available():
        return False
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # a torch build without the check
        return False


def auto_dtype(device: torch.device) -> torch.dtype:
    """The dtype `auto` picks for a stage on `device`."""
    if device.type == "cuda":
        return torch.float16
    if device.type == "cpu" and cpu_has_bf16_matmul():
        return torch.bfloat16
    return torch.float32


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """A dtype setting ("auto", "float32", "float16", "bfloat16") as a torch dtype on
    `device`."""
    if dtype == "auto":
        return auto_dtype(device)
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; expected one of {', '.join(DTYPES)}")
    return getattr(torch, dtype)


def dtype_name(dtype: torch.dtype) -> str:
    """The dtype's name, e.g. "bfloat16" (what configs, logs and ListModels say)."""
    return str(dtype).removeprefix("torch.")
