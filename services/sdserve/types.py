"""Domain types and their protobuf conversions.

Only this module and the edges (deployments, cli) import the generated code in `sdserve.v1`.
`GenerateParams.from_pb` is where every public request is validated.
"""

from __future__ import annotations

import math
import secrets
from dataclasses import dataclass
from typing import TYPE_CHECKING

from sdserve.config import SCHEDULER_NAMES, DefaultsConfig, LimitsConfig
from sdserve.errors import InvalidArgument
from sdserve.v1 import diffusion_pb2, stages_pb2

if TYPE_CHECKING:
    import torch

    from sdserve.jobs.queue import JobRecord

SEED_SPACE = 2**64


@dataclass(frozen=True)
class GenerateParams:
    """A validated generation request, defaults filled in."""

    prompt: str
    negative_prompt: str
    width: int
    height: int
    steps: int
    guidance_scale: float
    scheduler: str
    seed: int
    num_images: int

    @property
    def seeds(self) -> list[int]:
        """Image i's seed: seed + i, wrapping at 2**64."""
        return [(self.seed + i) % SEED_SPACE for i in range(self.num_images)]

    @property
    def guided(self) -> bool:
        """Whether classifier-free guidance runs (it needs the negative prompt's embeddings)."""
        return self.guidance_scale > 1

    @classmethod
    def from_pb(
        cls,
        request: diffusion_pb2.GenerateRequest,
        *,
        limits: LimitsConfig,
        defaults: DefaultsConfig,
        native_size: tuple[int, int],
    ) -> GenerateParams:
        """Validates a request against the configured limits.

        Raises:
            InvalidArgument: naming the first invalid field.
        """
        if not request.prompt.strip():
            raise InvalidArgument("prompt", "must not be empty")
        for name in ("prompt", "negative_prompt"):
            n = len(getattr(request, name))
            if n > limits.max_prompt_chars:
                raise InvalidArgument(
                    name, f"is {n} characters long; the limit is {limits.max_prompt_chars}"
                )
        size = {}
        for name, native in zip(("width", "height"), native_size, strict=True):
            value = getattr(request, name) if request.HasField(name) else native
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
        steps = request.steps if request.HasField("steps") else defaults.steps
        if not 1 <= steps <= limits.max_steps:
            raise InvalidArgument("steps", f"must be within 1..{limits.max_steps}, got {steps}")
        guidance = (
            request.guidance_scale
            if request.HasField("guidance_scale")
            else defaults.guidance_scale
        )
        if not math.isfinite(guidance) or guidance < 0:
            raise InvalidArgument("guidance_scale", f"must be finite and >= 0, got {guidance}")
        scheduler = request.scheduler or defaults.scheduler
        if scheduler not in SCHEDULER_NAMES:
            raise InvalidArgument(
                "scheduler",
                f"unknown scheduler {scheduler!r}; choose one of {', '.join(SCHEDULER_NAMES)}",
            )
        num_images = request.num_images if request.HasField("num_images") else 1
        if not 1 <= num_images <= limits.max_num_images:
            raise InvalidArgument(
                "num_images", f"must be within 1..{limits.max_num_images}, got {num_images}"
            )
        seed = request.seed if request.HasField("seed") else secrets.randbelow(2**32)
        return cls(
            prompt=request.prompt,
            negative_prompt=request.negative_prompt,
            width=size["width"],
            height=size["height"],
            steps=steps,
            guidance_scale=float(guidance),
            scheduler=scheduler,
            seed=seed,
            num_images=num_images,
        )

    def to_pb(self) -> diffusion_pb2.GenerateRequest:
        """The request that reproduces this one exactly (every optional field set)."""
        return diffusion_pb2.GenerateRequest(
            prompt=self.prompt,
            negative_prompt=self.negative_prompt,
            width=self.width,
            height=self.height,
            steps=self.steps,
            guidance_scale=self.guidance_scale,
            seed=self.seed,
            scheduler=self.scheduler,
            num_images=self.num_images,
        )

    def resolved_pb(self) -> diffusion_pb2.ResolvedParameters:
        return diffusion_pb2.ResolvedParameters(
            width=self.width,
            height=self.height,
            steps=self.steps,
            guidance_scale=self.guidance_scale,
            scheduler=self.scheduler,
        )

    def png_parameters(self, seed: int, model: str = "") -> str:
        """The `parameters` PNG text chunk, in the format AUTOMATIC1111 writes and reads."""
        lines = [self.prompt]
        if self.negative_prompt:
            lines.append(f"Negative prompt: {self.negative_prompt}")
        fields = [
            f"Steps: {self.steps}",
            f"Sampler: {self.scheduler}",
            f"CFG scale: {self.guidance_scale:g}",
            f"Seed: {seed}",
            f"Size: {self.width}x{self.height}",
        ]
        if model:
            fields.append(f"Model: {model}")
        fields.append("Generator: sdserve")
        lines.append(", ".join(fields))
        return "\n".join(lines)


_PRIORITY_NAMES = {
    diffusion_pb2.JOB_PRIORITY_UNSPECIFIED: "normal",
    diffusion_pb2.JOB_PRIORITY_HIGH: "high",
    diffusion_pb2.JOB_PRIORITY_NORMAL: "normal",
    diffusion_pb2.JOB_PRIORITY_LOW: "low",
}
_PRIORITY_VALUES = {"high": diffusion_pb2.JOB_PRIORITY_HIGH,
                    "normal": diffusion_pb2.JOB_PRIORITY_NORMAL,
                    "low": diffusion_pb2.JOB_PRIORITY_LOW}  # fmt: skip


def job_priority_name(priority: int) -> str:
    """The queue's name for a JobPriority value. Raises InvalidArgument for unknown values."""
    try:
        return _PRIORITY_NAMES[priority]
    except KeyError:
        raise InvalidArgument("priority", f"unknown value {priority}") from None


def job_to_pb(record: JobRecord) -> diffusion_pb2.Job:
    """A job record as the public `Job` message (with its images when `record.result` is set)."""
    job = diffusion_pb2.Job(
        job_id=record.job_id,
        state=diffusion_pb2.JobState.Value(f"JOB_STATE_{record.state.value}"),
        priority=_PRIORITY_VALUES.get(record.priority, diffusion_pb2.JOB_PRIORITY_NORMAL),
        step=record.step,
        total_steps=record.total_steps,
        attempts=record.attempts,
        error=record.error,
        created_at=record.created_at,
        started_at=record.started_at or 0.0,
        finished_at=record.finished_at or 0.0,
        cancel_requested=record.cancel_requested,
        worker=record.worker,
    )
    if record.result is not None:
        job.result.ParseFromString(record.result)
    return job


def tensor_to_pb(tensor: torch.Tensor) -> stages_pb2.Tensor:
    """dtype + shape + raw bytes. Goes through a uint8 view, not numpy, so bfloat16 works."""
    t = tensor.detach().contiguous().cpu()
    raw = t.reshape(-1).view(torch_module().uint8).numpy().tobytes() if t.numel() else b""
    return stages_pb2.Tensor(
        dtype=str(t.dtype).removeprefix("torch."), shape=list(t.shape), data=raw
    )


def tensor_from_pb(msg: stages_pb2.Tensor) -> torch.Tensor:
    """Inverse of `tensor_to_pb`; returns a CPU tensor that owns its memory."""
    torch = torch_module()
    dtype = getattr(torch, msg.dtype, None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"unknown tensor dtype {msg.dtype!r}")
    if not msg.data:
        return torch.empty(tuple(msg.shape), dtype=dtype)
    flat = torch.frombuffer(bytearray(msg.data), dtype=torch.uint8).view(dtype)
    return flat.reshape(tuple(msg.shape))


def torch_module():
    """torch, imported on first use: the ingress handles tensors only as opaque messages."""
    import torch

    return torch
