"""The public API's domain types: a request as sent (`GenerateFields`), as validated
(`GenerateParams`), and what the request path yields for it (`Queued`, `Progress`, `Preview`,
then a `Result`).

Plain dataclasses: no protobuf here. The edges make them from the public messages and back
(`sdserve.api.proto`); `sdserve.api.validate` turns fields into parameters.
"""

from __future__ import annotations

from dataclasses import dataclass, field

SEED_SPACE = 2**64


@dataclass(frozen=True)
class ControlFields:
    """One `controls` entry as the client sent it (None: unset, the default applies)."""

    name: str
    image: bytes = field(default=b"", repr=False)
    scale: float | None = None
    start: float | None = None
    end: float | None = None
    guess_mode: bool = False
    preprocess: str = ""
    canny_low: float | None = None
    canny_high: float | None = None


@dataclass(frozen=True)
class ControlParams:
    """One validated `controls` entry, defaults filled in."""

    name: str
    image: bytes = field(repr=False)
    """PNG or JPEG as sent (decoded by the request path, `pipeline.control_images`)."""
    scale: float = 1.0
    start: float = 0.0
    end: float = 1.0
    guess_mode: bool = False
    preprocess: str = ""
    """"" or "canny"."""
    canny_low: float = 100.0
    canny_high: float = 200.0


@dataclass(frozen=True)
class GenerateFields:
    """A generation request's fields as the client sent them, not yet checked (a
    `GenerateRequest`'s, less `preview_every`, which the edge keeps). None: an optional field
    left unset (the default applies); "" or b"": the same for the rest."""

    prompt: str = ""
    negative_prompt: str = ""
    width: int | None = None
    height: int | None = None
    steps: int | None = None
    guidance_scale: float | None = None
    seed: int | None = None
    scheduler: str = ""
    num_images: int | None = None
    init_image: bytes = field(default=b"", repr=False)
    strength: float | None = None
    mask_image: bytes = field(default=b"", repr=False)
    guidance_stop: float | None = None
    cache_interval: int | None = None
    model: str = ""
    loras: tuple[tuple[str, float | None], ...] = ()
    """(name, scale) of each adapter asked for; scale None: unset (1)."""
    controls: tuple[ControlFields, ...] = ()
    max_sequence_length: int | None = None
    """Diffusion transformers: T5 tokens (None: the family's default)."""
    true_cfg_scale: float | None = None
    """FLUX: true classifier-free guidance scale (None: 1, none)."""
    shift: float | None = None
    """Diffusion transformers: the sigma shift (None: the model's own)."""


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
    controls: tuple[ControlParams, ...] = ()
    """ControlNets of that model conditioning it."""
    max_sequence_length: int = 0
    """Diffusion transformers: T5 tokens (0: a U-Net model's request)."""
    true_cfg_scale: float = 1.0
    """FLUX: true classifier-free guidance scale (1: none)."""
    shift: float = 0.0
    """Diffusion transformers: the sigma shift (0: the model's own)."""

    @property
    def seeds(self) -> list[int]:
        """Image i's seed: seed + i, wrapping at 2**64."""
        return [(self.seed + i) % SEED_SPACE for i in range(self.num_images)]

    @property
    def guided(self) -> bool:
        """Whether classifier-free guidance runs (it needs the negative prompt's embeddings)."""
        return self.guidance_scale > 1

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
        if self.max_sequence_length > 0:
            fields.append(f"Max sequence length: {self.max_sequence_length}")
        if self.true_cfg_scale != 1:
            fields.append(f"True CFG scale: {self.true_cfg_scale:g}")
        if self.shift > 0:
            fields.append(f"Shift: {self.shift:g}")
        if model:
            fields.append(f"Model: {model}")
        if self.loras:
            fields.append("LoRA: " + " ".join(f"{n}:{s:g}" for n, s in self.loras))
        if self.controls:
            fields.append("ControlNet: " + " ".join(
                f"{c.name}:{c.scale:g}:{c.start:g}:{c.end:g}" for c in self.controls))  # fmt: skip
        fields.append("Generator: sdserve")
        lines.append(", ".join(fields))
        return "\n".join(lines)


# --- What the request path yields: Queued, Progress x steps (+ Preview), then Result --------


@dataclass(frozen=True)
class Queued:
    """The request waits for a slot in the Denoiser's running batch."""

    position: int
    """Requests ahead of it in its Denoiser's queue."""
    request_id: str


@dataclass(frozen=True)
class Progress:
    """A denoising step finished."""

    step: int
    total: int
    elapsed_s: float
    """Seconds since the request reached the server."""


@dataclass(frozen=True)
class Preview:
    """Cheap previews of the current latents (no VAE), one PNG per image."""

    step: int
    pngs: tuple[bytes, ...]


@dataclass(frozen=True)
class Timings:
    """Seconds per stage, seen by the request path (transport included), and in all."""

    text_encoder_s: float
    denoiser_s: float
    vae_decoder_s: float
    total_s: float
    vae_encoder_s: float = 0.0
    """Image inputs only (concurrent with the text encoder)."""
    denoiser_queue_s: float = 0.0
    """Of `denoiser_s`: waiting in the Denoiser's queue."""
    denoiser_paused_s: float = 0.0
    """Of `denoiser_s`: paused for interactive requests (jobs only)."""
    safety_checker_s: float = 0.0
    """The safety checker (0: the model has none)."""


@dataclass(frozen=True)
class Result:
    """The generated images, in seed order."""

    request_id: str
    params: GenerateParams
    pngs: tuple[bytes, ...]
    timings: Timings
    nsfw: tuple[bool, ...] = ()
    """Per image, whether the model's safety checker flagged it (empty: the model has none)."""
    blocked: tuple[bool, ...] = ()
    """Per image, whether it was replaced by a black one (`safety: block`)."""


GenerateEvent = Queued | Progress | Preview | Result
"""What `StagePath.run` yields."""
