"""Tensors of the stage messages on the stage side: unpacking what came over the wire, packing
what goes back, and making a stage's outputs the caller's own."""

from __future__ import annotations

import torch

from sdserve.stages.messages import PackedTensor, Tensor


def pack(tensor: torch.Tensor) -> PackedTensor:
    """dtype + shape + raw bytes. Goes through a uint8 view, not numpy, so bfloat16 works."""
    t = tensor.detach().contiguous().cpu()
    raw = t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""
    return PackedTensor(str(t.dtype).removeprefix("torch."), tuple(t.shape), raw)


def unpack(tensor: Tensor) -> torch.Tensor:
    """The torch tensor: a packed one as a CPU tensor that owns its memory, a torch one as it
    is. Raises ValueError for an unknown dtype."""
    if isinstance(tensor, torch.Tensor):
        return tensor
    dtype = getattr(torch, tensor.dtype, None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"unknown tensor dtype {tensor.dtype!r}")
    if not tensor.data:
        return torch.empty(tensor.shape, dtype=dtype)
    flat = torch.frombuffer(bytearray(tensor.data), dtype=torch.uint8).view(dtype)
    return flat.reshape(tensor.shape)


def unpack_optional(tensor: Tensor | None) -> torch.Tensor | None:
    return None if tensor is None else unpack(tensor)


def returned(tensor: torch.Tensor | None) -> torch.Tensor | None:
    """A stage's output as it hands it over: a copy on the CPU, contiguous, that no one else
    holds and that its caller may change (not an inference tensor), as its serialized form
    always was. Call it on the stage's torch thread, where a GPU's copy waits for the GPU."""
    if tensor is None:
        return None
    return tensor.detach().to("cpu", memory_format=torch.contiguous_format, copy=True)
