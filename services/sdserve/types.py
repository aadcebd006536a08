"""Domain types and their protobuf conversions (TGI's way: the types own `from_pb` / `to_pb`).

The request path works on these: a validated `GenerateParams` in, `Queued`, `Progress`,
`Preview` and finally a `Result` out. Public protobuf messages (`sdserve.v1.diffusion_pb2`)
appear only at the edges: here, in the gRPC ingress and in the CLI. `GenerateParams.from_pb` is
where every public request is validated.
"""

from __future__ import annotations

import math
import secrets
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from sdserve.config import SCHEDULER_NAMES, DefaultsConfig, LimitsConfig
from sdserve.errors import InvalidArgument
from sdserve.image_inputs import check_image_inputs, check_strength
from sdserve.request_fields import check_cheaper_steps, check_loras
from sdserve.v1 import diffusion_pb2

if TYPE_CHECKING:
    from sdserve.jobs.records import JobRecord

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
    init_image: bytes = field(default=b"", repr=False)
    """Image-to-image and inpainting: the image to start from (empty: text-to-image)."""
    mask_image: bytes = field(default=b"", repr=False)
    """Inpainting: white = repaint."""
    strength: float = 0.0
    """With an init image: the share of the steps that run (0 for text-to-image)."""
    guidance_stop: float = 1.0
    """Guidance runs until this fraction of the steps (1: every step)."""
    cache_interval: int = 1
    """DeepCache: the whole U-Net every this many steps (1: off)."""
    model: str = ""
    """The served model that runs it ("": the server's default)."""
    loras: tuple[tuple[str, float], ...] = ()
    """LoRA adapters of that model, (name, scale) each."""

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
        model: str = "",
    ) -> GenerateParams:
        """Validates a request against the configured limits, for `model` (the served model
        it names, checked by the caller, whose native size and defaults are given).

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
        images = check_image_inputs(request, limits)
        size = _checked_size(request, limits, images.size if images else native_size, images)
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
        image_fields = {}
        if images:
            strength = check_strength(request, defaults.strength, steps)
            image_fields = dict(init_image=images.init_image, mask_image=images.mask_image,
                                strength=strength)  # fmt: skip
        image_fields.update(check_cheaper_steps(request, limits))
        if request.loras:
            image_fields["loras"] = check_loras(request, limits)
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
            model=model,
            **image_fields,
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
            init_image=self.init_image,
            mask_image=self.mask_image,
            **({"strength": self.strength} if self.init_image else {}),
            guidance_stop=self.guidance_stop,
            cache_interval=self.cache_interval,
            model=self.model,
            loras=self.loras_pb(),
        )

    def loras_pb(self) -> list[diffusion_pb2.LoraWeight]:
        return [diffusion_pb2.LoraWeight(name=n, scale=s) for n, s in self.loras]

    def resolved_pb(self) -> diffusion_pb2.ResolvedParameters:
        return diffusion_pb2.ResolvedParameters(
            width=self.width,
            height=self.height,
            steps=self.steps,
            guidance_scale=self.guidance_scale,
            scheduler=self.scheduler,
            strength=self.strength,
            guidance_stop=self.guidance_stop,
            cache_interval=self.cache_interval,
            model=self.model,
            loras=self.loras_pb(),
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
        if self.init_image:
            fields.append(f"Denoising strength: {self.strength:g}")
        if self.guidance_stop < 1:
            fields.append(f"Guidance stop: {self.guidance_stop:g}")
        if self.cache_interval > 1:
            fields.append(f"DeepCache interval: {self.cache_interval}")
        if model:
            fields.append(f"Model: {model}")
        if self.loras:
            fields.append("LoRA: " + " ".join(f"{n}:{s:g}" for n, s in self.loras))
        fields.append("Generator: sdserve")
        lines.append(", ".join(fields))
        return "\n".join(lines)


def _checked_size(request, limits: LimitsConfig, default: tuple[int, int], images) -> dict:
    """{"width": w, "height": h}: the request's, or `default` (the init image's size, or the
    model's native one) for unset fields. An init image fixes the size."""
    size = {}
    for name, fallback in zip(("width", "height"), default, strict=True):
        value = getattr(request, name) if request.HasField(name) else fallback
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


# --- What the request path yields: Queued, Progress x steps (+ Preview), then Result --------


@dataclass(frozen=True)
class Queued:
    """The request waits for a slot in the Denoiser's running batch."""

    position: int
    """Requests ahead of it in its Denoiser's queue."""
    request_id: str

    def to_pb(self) -> diffusion_pb2.GenerateEvent:
        queued = diffusion_pb2.Queued(position=self.position, request_id=self.request_id)
        return diffusion_pb2.GenerateEvent(queued=queued)


@dataclass(frozen=True)
class Progress:
    """A denoising step finished."""

    step: int
    total: int
    elapsed_s: float
    """Seconds since the request reached the server."""

    def to_pb(self) -> diffusion_pb2.GenerateEvent:
        progress = diffusion_pb2.Progress(step=self.step, total=self.total,
                                          elapsed_s=self.elapsed_s)  # fmt: skip
        return diffusion_pb2.GenerateEvent(progress=progress)


@dataclass(frozen=True)
class Preview:
    """Cheap previews of the current latents (no VAE), one PNG per image."""

    step: int
    pngs: tuple[bytes, ...]

    def to_pb(self) -> diffusion_pb2.GenerateEvent:
        preview = diffusion_pb2.Preview(step=self.step, png=self.pngs)
        return diffusion_pb2.GenerateEvent(preview=preview)


@dataclass(frozen=True)
class Timings:
    """Seconds per stage, seen by the request path (transport included), and in all."""

    text_encoder_s: float
    denoiser_s: float
    vae_decoder_s: float
    total_s: float
    vae_encoder_s: float = 0.0
    """Image inputs only (concurrent with the text encoder)."""


@dataclass(frozen=True)
class Result:
    """The generated images, in seed order."""

    request_id: str
    params: GenerateParams
    pngs: tuple[bytes, ...]
    timings: Timings

    def to_response(self) -> diffusion_pb2.GenerateResponse:
        p = self.params
        images = [diffusion_pb2.Image(png=png, seed=seed, width=p.width, height=p.height)
                  for png, seed in zip(self.pngs, p.seeds, strict=True)]  # fmt: skip
        return diffusion_pb2.GenerateResponse(
            images=images,
            timings=diffusion_pb2.StageTimings(**vars(self.timings)),
            request_id=self.request_id,
            parameters=p.resolved_pb(),
        )

    def to_pb(self) -> diffusion_pb2.GenerateEvent:
        return diffusion_pb2.GenerateEvent(result=self.to_response())


GenerateEvent = Queued | Progress | Preview | Result
"""What `StagePath.run` yields."""


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
