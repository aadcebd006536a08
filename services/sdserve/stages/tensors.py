"""Tensors in stage messages: dtype + shape + raw bytes (`stages.proto`'s `Tensor`)."""

from __future__ import annotations

import torch

from sdserve.v1 import stages_pb2


def tensor_to_pb(tensor: torch.Tensor) -> stages_pb2.Tensor:
    """dtype + shape + raw bytes. Goes through a uint8 view, not numpy, so bfloat16 works."""
    t = tensor.detach().contiguous().cpu()
    raw = t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""
    return stages_pb2.Tensor(
        dtype=str(t.dtype).removeprefix("torch."), shape=list(t.shape), data=raw
    )


def tensor_from_pb(msg: stages_pb2.Tensor) -> torch.Tensor:
    """Inverse of `tensor_to_pb`; returns a CPU tensor that owns its memory."""
    dtype = getattr(torch, msg.dtype, None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"unknown tensor dtype {msg.dtype!r}")
    if not msg.data:
        return torch.empty(tuple(msg.shape), dtype=dtype)
    flat = torch.frombuffer(bytearray(msg.data), dtype=torch.uint8).view(dtype)
    return flat.reshape(tuple(msg.shape))
