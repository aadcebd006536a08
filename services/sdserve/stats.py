"""The typed statistics that serving code emits (vLLM's way: plain dataclasses, no metric calls in
the hot loop).

The engine, the stage services, the stage path, the job worker and the RPC error wrapper each
hand these to a `sdserve.metrics.StatsLogger` (`stats.record(StepStats(...))`), the one place
that turns them into Prometheus series and keeps the counters the Denoiser's Stats RPC reports.
This module imports nothing but the standard library, so every layer may use it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal


@dataclass(frozen=True)
class StepStats:
    """What one U-Net forward of the Denoiser engine did."""

    request_ids: tuple[str, ...]
    """Requests with images in this forward."""
    batch_size: int
    """Images in the forward."""
    rows: int
    """U-Net batch rows (images plus unconditional rows for guided images), shallow included."""
    latent_shape: tuple[int, ...]
    waiting: int
    """Requests still waiting after admission."""
    running: int
    """Requests in the running batch (all buckets)."""
    duration_s: float
    """Seconds of the step: forward, guidance and scheduler updates."""
    shallow_rows: int = 0
    """Of `rows`, those that ran only the shallow branch on cached deep features (DeepCache)."""
    controlled: int = 0
    """Of the images, those that a ControlNet conditioned at this step."""


@dataclass(frozen=True)
class RequestAdmitted:
    """A request entered the Denoiser engine's running batch."""

    wait_s: float
    """Seconds it waited for a slot."""
    request_class: str = "interactive"
    """interactive or bulk (`sdserve.pipeline.scheduling`)."""


@dataclass(frozen=True)
class RequestPaused:
    """A running request of the Denoiser engine was paused (preempted) at a step boundary."""

    request_class: str = "bulk"


@dataclass(frozen=True)
class RequestEnded:
    """A request left the Denoiser engine."""

    outcome: Literal["finished", "cancelled", "expired", "failed"]
    """expired: dropped because its deadline passed; cancelled: its caller went away."""
    waiting: int
    """Requests waiting in the engine afterwards."""
    running: int
    """Requests running in the engine afterwards."""
    request_class: str = "interactive"
    paused_s: float = 0.0
    """Seconds it sat out forwards, paused for interactive requests (finished requests)."""


@dataclass(frozen=True)
class RequestServed:
    """The stage path produced a request's images."""

    images: int
    stage_seconds: dict[str, float] = field(default_factory=dict)
    """Seconds per stage ("text_encoder", "denoiser", "vae_decoder"), seen by the caller."""
    model: str = ""
    """The served model that made them."""


@dataclass(frozen=True)
class DeadlineOutcome:
    """A request with a deadline ended: whether it met it (its SLO), by class."""

    request_class: str
    met: bool


@dataclass(frozen=True)
class RpcDone:
    """A public RPC ended."""

    rpc: str
    code: str
    """The gRPC status code's name ("OK", "INVALID_ARGUMENT", ...)."""
    seconds: float


@dataclass(frozen=True)
class TenantRequest:
    """Per-tenant limits (sdserve/orchestration/tenant_limits.py) decided on a request."""

    tenant: str
    outcome: Literal["admitted", "rate_limited", "concurrency_limited"]


JOB_EVENTS = ("started", "succeeded", "failed", "cancelled", "retried", "dead_lettered", "lost")
"""What a job worker reports: an attempt started; a job ended SUCCEEDED, FAILED or CANCELLED;
a failed attempt was put back (retried); a job used up its attempts (dead_lettered, also
counted as failed); an attempt lost its lease to another worker."""


@dataclass(frozen=True)
class JobEvent:
    """Something a job worker did (one of `JOB_EVENTS`)."""

    name: str


@dataclass(frozen=True)
class QueueDepth:
    """The job queue's length per priority, or None when Redis did not answer."""

    lengths: dict[str, int] | None


@dataclass(frozen=True)
class ModelLoaded:
    """A stage replica loaded its part of the model."""

    stage: str
    seconds: float


@dataclass(frozen=True)
class UNetCompiled:
    """The Denoiser compiled a graph of its U-Net (torch.compile, `engine.compile`)."""

    bucket: int
    """Rows of the padded forward it compiled for; 0 for a dynamic graph (any rows)."""
    latent_shape: tuple[int, ...]
    """(channels, h, w) of the latents."""
    seconds: float
    """Time of the forward that compiled (compilation and one run)."""
    warmup: bool
    """During start-up's warm-up; False: a recompile while serving."""


@dataclass(frozen=True)
class GpuMemory:
    """CUDA memory of a stage replica, in bytes."""

    stage: str
    allocated: int
    reserved: int


@dataclass(frozen=True)
class ImagesChecked:
    """A model's safety checker checked a request's images: how many passed, were flagged
    (and marked: `safety: flag`) and were blocked (replaced by black: `safety: block`)."""

    model: str
    passed: int
    flagged: int
    blocked: int
