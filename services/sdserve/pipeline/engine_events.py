"""What the Denoiser engine tells each request (`sdserve.pipeline.engine`): plain events, handed
to the request's callback on the engine's thread."""

from __future__ import annotations

from dataclasses import dataclass

import torch


# Events, in the order a request sees them: Queued, Started, Step x N (Paused
# between steps, for a preempted bulk request), then Finished, or
# Cancelled / Failed at any point.
@dataclass(frozen=True)
class Queued:
    position: int
    """Requests waiting ahead of this one (0: next to be admitted)."""


@dataclass(frozen=True)
class Started:
    wait_s: float
    """Seconds between submission and admission into the running batch."""


@dataclass(frozen=True)
class Step:
    step: int
    """Steps done (1..total)."""
    total: int
    elapsed_s: float
    """Seconds since submission."""
    latents: torch.Tensor | None = None
    """Current latents (num_images, C, h, w), only on the request's preview steps."""


@dataclass(frozen=True)
class Paused:
    """A bulk request sits out forwards from this step boundary (preempted) until resumed."""


@dataclass(frozen=True)
class Finished:
    latents: torch.Tensor
    """Final latents, shape (num_images, C, h, w)."""
    paused_s: float = 0.0
    """Seconds it sat out forwards, paused for interactive requests."""


@dataclass(frozen=True)
class Cancelled:
    reason: str


@dataclass(frozen=True)
class Failed:
    error: BaseException


Event = Queued | Started | Paused | Step | Finished | Cancelled | Failed

DEADLINE_EXCEEDED = "deadline exceeded"
"""The reason of a `Cancelled` request whose deadline passed."""
