"""What the client returns: frozen dataclasses, each built from its protobuf message by
`from_pb`. A program that uses `sdserve.client` never sees a protobuf message.

PIL is imported only when an image is asked for (`GeneratedImage.image`, a `Preview`).
"""

from __future__ import annotations

import io
from dataclasses import dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING

from sdserve.v1 import diffusion_pb2

if TYPE_CHECKING:
    import grpc
    from PIL import Image


def _f32(value: float) -> float:
    """A proto float32 as the decimal it was sent as (0.4, not 0.4000000059604645)."""
    return float(f"{value:.7g}")


class _SameFields:
    """`from_pb` for a dataclass whose fields are its message's, by the same names."""

    @classmethod
    def from_pb(cls, pb):
        return cls(**_same_fields(cls, pb))


def _same_fields(cls, pb) -> dict:
    return {field.name: getattr(pb, field.name) for field in fields(cls)}


def _open_png(png: bytes) -> Image.Image:
    from PIL import Image

    image = Image.open(io.BytesIO(png))
    image.load()
    return image


class ClientError(Exception):
    """A failed RPC: `code` is the gRPC status name ("INVALID_ARGUMENT", "UNAVAILABLE", ...),
    `message` the server's details (for INVALID_ARGUMENT it starts with the field's name).
    `str()` is "CODE: message"; the grpc.RpcError is the `__cause__`."""

    def __init__(self, code: str, message: str):
        super().__init__(code, message)
        self.code = code
        self.message = message

    def __str__(self) -> str:
        return f"{self.code}: {self.message}"

    @classmethod
    def from_rpc(cls, exc: grpc.RpcError) -> ClientError:
        return cls(exc.code().name, exc.details() or "")


@dataclass(frozen=True)
class GeneratedImage(_SameFields):
    """One generated image: `png` carries its generation parameters in a `parameters` text
    chunk."""

    png: bytes
    seed: int
    """Send it back (`seed=`) to get the same pixels."""
    width: int
    height: int
    nsfw: bool = False
    """The model's safety checker flagged it (always False for a model with `safety: off`)."""
    blocked: bool = False
    """It was flagged and replaced by a black image (`safety: block`)."""

    @property
    def image(self) -> Image.Image:
        """The image, decoded (RGB)."""
        return _open_png(self.png)

    def save(self, path: str | Path) -> Path:
        """Writes the PNG as received (parameters chunk included); returns the path."""
        path = Path(path)
        path.write_bytes(self.png)
        return path


@dataclass(frozen=True)
class Control:
    """A ControlNet conditioning a request (`controls=[Control("edges", "edges.png")]`).

    None leaves a field to the server's default (scale 1, start 0, end 1; Canny thresholds 100
    and 200)."""

    name: str
    """A ControlNet of the model (`Client.controlnets()` lists them)."""
    image: bytes | str | Path | Image.Image = b""
    """The control image: PNG or JPEG bytes, a path to one, or a PIL image (sent as PNG)."""
    scale: float | None = None
    start: float | None = None
    """The fraction of the steps before which it is off."""
    end: float | None = None
    """The fraction of the steps after which it is off."""
    guess_mode: bool = False
    preprocess: str = ""
    """"" (the image as it is) or "canny" (the server draws its edges: send a photo)."""
    canny_low: float | None = None
    canny_high: float | None = None

    @classmethod
    def from_pb(cls, pb: diffusion_pb2.Control) -> Control:
        optional = {f: _f32(getattr(pb, f)) if pb.HasField(f) else None
                    for f in ("scale", "start", "end", "canny_low", "canny_high")}  # fmt: skip
        return cls(pb.name, pb.image, guess_mode=pb.guess_mode, preprocess=pb.preprocess,
                   **optional)  # fmt: skip


@dataclass(frozen=True)
class Parameters:
    """The parameters a request ran with, the server's defaults filled in."""

    width: int
    height: int
    steps: int
    guidance_scale: float
    scheduler: str
    strength: float
    """Image inputs only: the strength used (0 for text-to-image)."""
    guidance_stop: float
    """1: guidance on every step."""
    cache_interval: int
    """DeepCache's interval (1: off)."""
    model: str
    loras: tuple[tuple[str, float], ...] = ()
    """The LoRA adapters it ran with: (name, scale) each."""
    controls: tuple[Control, ...] = ()
    """The ControlNets it ran with, every field filled in (their images left out)."""
    max_sequence_length: int = 0
    """Diffusion transformers: the T5 tokens used (0 for a U-Net model)."""
    true_cfg_scale: float = 1.0
    """FLUX: the true CFG scale used (1: none)."""
    shift: float = 0.0
    """Diffusion transformers: the sigma shift used (0: the model's own, by the image's size)."""

    @classmethod
    def from_pb(cls, pb: diffusion_pb2.ResolvedParameters) -> Parameters:
        own = ("loras", "controls")
        values = {f.name: getattr(pb, f.name) for f in fields(cls) if f.name not in own}
        loras = tuple((w.name, _f32(w.scale)) for w in pb.loras)
        return cls(**{name: _f32(v) if isinstance(v, float) else v for name, v in values.items()},
                   loras=loras, controls=tuple(map(Control.from_pb, pb.controls)))  # fmt: skip


@dataclass(frozen=True)
class Timings(_SameFields):
    """Seconds per stage of one request, and in all (`total_s`)."""

    text_encoder_s: float
    vae_encoder_s: float
    """Image inputs only (concurrent with the text encoder)."""
    denoiser_s: float
    vae_decoder_s: float
    total_s: float
    denoiser_queue_s: float = 0.0
    """Of `denoiser_s`: waiting in the Denoiser's queue."""
    denoiser_paused_s: float = 0.0
    """Of `denoiser_s`: paused for interactive requests (jobs only)."""
    safety_checker_s: float = 0.0
    """The safety checker (0: the model has none)."""


@dataclass(frozen=True)
class GenerateResult:
    """The generated images in seed order (seed, seed + 1, ...), with what made them."""

    images: list[GeneratedImage]
    parameters: Parameters
    timings: Timings
    request_id: str
    """The server's id for the request; every log line about it carries it."""

    @classmethod
    def from_pb(cls, pb: diffusion_pb2.GenerateResponse) -> GenerateResult:
        return cls(
            images=[GeneratedImage.from_pb(image) for image in pb.images],
            parameters=Parameters.from_pb(pb.parameters),
            timings=Timings.from_pb(pb.timings),
            request_id=pb.request_id,
        )


@dataclass(frozen=True)
class Queued(_SameFields):
    """Stream event, first: the request waits for a slot in the Denoiser's batch."""

    position: int
    """Requests ahead of it in its Denoiser replica's queue."""
    request_id: str


@dataclass(frozen=True)
class Progress(_SameFields):
    """Stream event: denoising step `step` of `total` finished."""

    step: int
    total: int
    elapsed_s: float
    """Seconds since the request reached the server."""


@dataclass(frozen=True)
class Preview:
    """Stream event (every `preview_every` steps): blurry previews of the current latents,
    one per image, at the requested size."""

    step: int
    images: list[Image.Image]

    @classmethod
    def from_pb(cls, pb: diffusion_pb2.Preview) -> Preview:
        return cls(step=pb.step, images=[_open_png(png) for png in pb.png])


Event = Queued | Progress | Preview | GenerateResult
"""What `Client.stream` yields: Queued, Progress per step (Preview among them), then the
GenerateResult."""

_EVENTS = {"queued": Queued, "progress": Progress, "preview": Preview, "result": GenerateResult}


def event_from_pb(pb: diffusion_pb2.GenerateEvent) -> Event:
    kind = pb.WhichOneof("event")
    if kind is None:
        raise ValueError("a GenerateEvent with no event set")
    return _EVENTS[kind].from_pb(getattr(pb, kind))


FINAL_STATES = ("SUCCEEDED", "FAILED", "CANCELLED")


@dataclass(frozen=True)
class Job:
    """An asynchronous job as the server knows it."""

    job_id: str
    state: str
    """"QUEUED", "RUNNING", or a final one: "SUCCEEDED", "FAILED", "CANCELLED"."""
    priority: str
    """"high", "normal" or "low"."""
    step: int
    """Denoising steps done in the current attempt (RUNNING), or when it ended."""
    total_steps: int
    attempts: int
    """Times a worker started it; above 1 when a worker died or a stage failed mid-job."""
    error: str
    """Why it FAILED, or why the last attempt did not finish."""
    cancel_requested: bool
    result: GenerateResult | None
    """Once SUCCEEDED (from `wait`, its last Job only)."""
    created_at: float
    """Seconds since the Unix epoch, as are started_at and finished_at (0: not yet)."""
    started_at: float
    finished_at: float
    worker: str
    """"host:pid:id" of the worker running it, or that ran its last attempt."""
    callback_url: str = ""
    """Where its end is delivered (a webhook); "" for none."""
    webhook_attempts: tuple[tuple[float, int, str], ...] = ()
    """Each attempt at delivering its end: (when, HTTP status or 0, error), oldest first."""

    @property
    def ended(self) -> bool:
        return self.state in FINAL_STATES

    @classmethod
    def from_pb(cls, pb: diffusion_pb2.Job) -> Job:
        return cls(
            job_id=pb.job_id,
            state=diffusion_pb2.JobState.Name(pb.state).removeprefix("JOB_STATE_"),
            priority=_PRIORITY_NAMES.get(pb.priority, "normal"),
            step=pb.step,
            total_steps=pb.total_steps,
            attempts=pb.attempts,
            error=pb.error,
            cancel_requested=pb.cancel_requested,
            result=GenerateResult.from_pb(pb.result) if pb.HasField("result") else None,
            created_at=pb.created_at,
            started_at=pb.started_at,
            finished_at=pb.finished_at,
            worker=pb.worker,
            callback_url=pb.callback_url,
            webhook_attempts=tuple((a.at, a.status, a.error) for a in pb.webhook_attempts),
        )


PRIORITIES = {
    "high": diffusion_pb2.JOB_PRIORITY_HIGH,
    "normal": diffusion_pb2.JOB_PRIORITY_NORMAL,
    "low": diffusion_pb2.JOB_PRIORITY_LOW,
}
_PRIORITY_NAMES = {value: name for name, value in PRIORITIES.items()}


@dataclass(frozen=True)
class Submitted(_SameFields):
    """A queued job (`job`, `wait` and `cancel` take its id)."""

    job_id: str
    created: bool
    """False when the idempotency key named an existing job, whose id this is."""


@dataclass(frozen=True)
class ModelStage(_SameFields):
    """How one stage of a served model computes."""

    stage: str
    """"text_encoder", "vae_encoder", "denoiser" or "vae_decoder"."""
    device: str
    dtype: str
    """"float32", "float16" or "bfloat16" (latents stay float32 whatever this is)."""
    compile: str
    """torch.compile mode: "off", "default" or "max-autotune"."""


@dataclass(frozen=True)
class ModelInfo:
    """One served model (`model=` takes its name)."""

    name: str
    family: str
    """"sd1", "sd2" or "sdxl", or a diffusion transformer: "sd3" or "flux"."""
    native_width: int
    native_height: int
    prediction_type: str
    """"epsilon" or "v_prediction" (U-Nets), "flow" (diffusion transformers)."""
    default_scheduler: str
    inpainting: bool
    """An inpainting model takes only requests with init_image and mask_image."""
    image_inputs: bool
    """Whether it takes init_image and mask_image."""
    stages: tuple[ModelStage, ...] = ()
    """How each stage computes, in request order."""

    @classmethod
    def from_pb(cls, pb: diffusion_pb2.ModelInfo) -> ModelInfo:
        plain = {f.name: getattr(pb, f.name) for f in fields(cls) if f.name != "stages"}
        return cls(**plain, stages=tuple(ModelStage.from_pb(s) for s in pb.stages))


@dataclass(frozen=True)
class LoraInfo:
    """A LoRA adapter a served model has (`loras=[(name, scale)]` takes its name)."""

    name: str
    model: str
    file_bytes: int
    loaded: bool
    """Whether the model's Denoiser holds it in memory now (adapters load on first use)."""

    @classmethod
    def from_pb(cls, pb: diffusion_pb2.LoraInfo, model: str) -> LoraInfo:
        return cls(pb.name, model, pb.file_bytes, pb.loaded)


@dataclass(frozen=True)
class ControlNetInfo:
    """A ControlNet a served model has (`controls=[Control(name, image)]` takes its name)."""

    name: str
    model: str
    file_bytes: int
    loaded: bool
    """Whether the model's Denoiser holds it in memory now (nets load on first use)."""
    misfit: str = ""
    """Why it cannot condition this model (a net of another family); "": it can."""

    @classmethod
    def from_pb(cls, pb: diffusion_pb2.ControlNetInfo, model: str) -> ControlNetInfo:
        return cls(pb.name, model, pb.file_bytes, pb.loaded, pb.misfit)
