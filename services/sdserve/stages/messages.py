"""What the stage services take and return: plain dataclasses holding tensors, bytes and numbers.

They are the domain side of the stage contract (`protos/sdserve/v1/stages.proto`), field for
field. The in-process stage client passes them as they are, tensors by reference; where a
message crosses a process, the Serve deployments and the Serve stage client serialize them
(`sdserve.serve.stage_messages`).

A tensor field holds a `torch.Tensor`, or a `PackedTensor` where the message came over the wire:
the ingress only passes tensors from one stage to the next, so it holds them packed and never
imports torch (nor does this module); a stage unpacks what it computes on
(`sdserve.stages.tensors`). A tensor a stage returns is contiguous, on the CPU, and its caller's
(nothing the stage keeps aliases it).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, TypeAlias

LoraScales = tuple[tuple[str, float], ...]
"""A request's LoRA adapters, (name, scale) each, validated by the edge."""


@dataclass(frozen=True)
class PackedTensor:
    """A tensor as bytes: its torch dtype name ("float32", "bfloat16", ...), its shape, and its
    elements in C order, little-endian (`stages.proto`'s `Tensor`)."""

    dtype: str
    shape: tuple[int, ...]
    data: bytes = field(repr=False)


if TYPE_CHECKING:
    import torch

Tensor: TypeAlias = "torch.Tensor | PackedTensor"
"""A tensor field's value: a torch tensor, or its packed form (what came over the wire)."""


@dataclass(frozen=True)
class TextEmbeddings:
    """What the U-Net is conditioned on for one prompt and its negative prompt (the
    pipeline's `PromptEmbeddings`)."""

    cond: Tensor | None
    """The prompt's embeddings, shape (1, seq_len, hidden), the text encoder's dtype (the T5
    stage: (1, max_sequence_length, d_model)). None from FLUX's CLIP, which gives only the
    pooled embedding."""
    uncond: Tensor | None = None
    """The negative prompt's, same shape; None without guidance."""
    cond_pooled: Tensor | None = None
    """SDXL, SD3 and FLUX: the prompt's pooled embedding, shape (1, projection_dim)."""
    uncond_pooled: Tensor | None = None
    """SDXL only: the negative prompt's; None without guidance."""


@dataclass(frozen=True)
class ImageEncoding:
    """The VaeEncoder's encoding of a request's image inputs (the pipeline's `EncodedImage`):
    distributions, not samples."""

    image: Tensor
    """Posterior moments of the init image, shape (1, 2 * latent_channels, h, w)."""
    scaling_factor: float
    masked: Tensor | None = None
    """Inpainting: the moments of the init image with the repainted area black."""
    mask: Tensor | None = None
    """Inpainting: the binarized mask at latent size, shape (1, 1, h, w), 1 = repaint."""


# --- TextEncoder: EncodeText -> TextEmbeddings ----------------------------------------------


@dataclass(frozen=True)
class EncodeText:
    """A prompt to encode and, for guidance, its negative prompt."""

    request_id: str
    """The client request's id, for logs."""
    prompt: str
    negative_prompt: str = ""
    """"" stands for none, as in diffusers."""
    with_uncond: bool = False
    """Whether to encode the negative prompt too (guidance_scale > 1)."""
    loras: LoraScales = ()
    """Adapters whose text-encoder weights apply to this request's encodes."""
    max_sequence_length: int = 0
    """T5 only: tokens the prompt is padded or cut to (0: the model's default)."""


# --- VaeEncoder: EncodeImage -> ImageEncoding -------------------------------------------------


@dataclass(frozen=True)
class EncodeImage:
    """A request's image inputs, their sizes checked by the edge."""

    request_id: str
    init_image: bytes = field(repr=False)
    """PNG or JPEG; each side a multiple of the VAE's scale factor."""
    mask_image: bytes = field(default=b"", repr=False)
    """Inpainting: PNG of the init image's size, white = repaint (empty: none)."""


# --- Denoiser: Denoise -> Denoised, or a stream of DenoiseEvents ------------------------------


@dataclass(frozen=True)
class ControlInput:
    """One ControlNet of a request, its image prepared by the request path
    (`pipeline.control_images.control_pixels`), validated by the edge."""

    name: str
    """A net in the model's ControlNet folder."""
    pixels: bytes = field(repr=False)
    """The control image at the request's size: RGB uint8, shape (height, width, 3)."""
    scale: float = 1.0
    start: float = 0.0
    end: float = 1.0
    guess_mode: bool = False


@dataclass(frozen=True)
class Denoise:
    """One request's whole denoising loop (it joins the Denoiser's running batch)."""

    request_id: str
    embeddings: TextEmbeddings
    """The TextEncoder's output."""
    width: int
    height: int
    steps: int
    guidance_scale: float
    """<= 1: no guidance."""
    scheduler: str
    seeds: tuple[int, ...]
    """One per image; each image gets its own CPU generator and scheduler."""
    preview_every: int = 0
    """Streams only: a preview with every this many steps (0: none)."""
    timeout_s: float = 0.0
    """Seconds it may wait and run in all; past it the request is dropped (0: no limit)."""
    progress_interval_s: float = 0.0
    """Streams only: step events at most this often (the last and preview steps always)."""
    init: ImageEncoding | None = None
    """Image-to-image and inpainting: the VaeEncoder's encoding (None: text-to-image)."""
    strength: float = 1.0
    """With `init`: the share of the schedule that runs, 0 < strength <= 1."""
    guidance_stop: float = 1.0
    """Guidance runs until step int(len(timesteps) * guidance_stop)."""
    cache_interval: int = 1
    """DeepCache: the full U-Net every this many steps (1: off)."""
    loras: LoraScales = ()
    """Adapters applied to this request's rows of the U-Net forwards."""
    controls: tuple[ControlInput, ...] = ()
    """ControlNets conditioning this request's rows of the U-Net forwards."""
    t5: TextEmbeddings | None = None
    """Diffusion transformers: the T5 encoder's output (cond, and uncond with guidance)."""
    true_cfg_scale: float = 1.0
    """FLUX only: true classifier-free guidance (<= 1: none)."""
    shift: float = 0.0
    """Diffusion transformers only: the sigma shift (0: the model's own)."""
    request_class: str = "interactive"
    """interactive (Generate, GenerateStream, HTTP) or bulk (a job): `pipeline.scheduling`."""
    priority: str = ""
    """A bulk job's priority: high, normal or low ("": normal)."""
    tenant: str = ""
    """Whose request it is: tenants take turns within a class."""


@dataclass(frozen=True)
class DenoiseQueued:
    """The request entered the Denoiser's queue (a stream's first event)."""

    position: int
    """Requests waiting ahead of it in this replica (0: admitted at the next step)."""


@dataclass(frozen=True)
class DenoiseStep:
    """A denoising step finished."""

    step: int
    """Steps done, 1..total."""
    total: int
    elapsed_s: float
    """Seconds since the Denoiser received the request."""
    preview_pngs: tuple[bytes, ...] = field(default=(), repr=False)
    """Every `preview_every` steps: a cheap RGB approximation of each image's latents."""


@dataclass(frozen=True)
class Denoised:
    """The final latents (a stream's last event)."""

    latents: Tensor
    """Shape (num_images, latent_channels, height / f, width / f), unscaled."""
    queue_s: float = 0.0
    """Seconds it waited in the Denoiser's queue before joining the running batch."""
    paused_s: float = 0.0
    """Seconds it sat out forwards, paused for interactive requests (bulk only)."""


DenoiseEvent = DenoiseQueued | DenoiseStep | Denoised


# --- VaeDecoder: Decode -> PNGs ---------------------------------------------------------------


@dataclass(frozen=True)
class Decode:
    """Latents to decode, and each image's `parameters` text for its PNG."""

    request_id: str
    latents: Tensor
    """The Denoiser's, shape (num_images, channels, h, w)."""
    parameters: tuple[str, ...] = ()


# --- SafetyChecker: CheckImages -> CheckedImages ---------------------------------------------


@dataclass(frozen=True)
class CheckImages:
    """A request's decoded images, to check (the VaeDecoder's PNGs, as it made them)."""

    request_id: str
    pngs: tuple[bytes, ...] = field(repr=False)


@dataclass(frozen=True)
class CheckedImages:
    """The checker's verdict on each image, and the images to return."""

    pngs: tuple[bytes, ...] = field(repr=False)
    """Each PNG with a `safety` text chunk (passed, flagged or blocked) beside its
    `parameters`; a blocked one is black, its size, its `parameters` kept."""
    nsfw: tuple[bool, ...]
    """Whether the checker flagged each image (diffusers' `nsfw_content_detected`)."""
    blocked: tuple[bool, ...]
    """Whether each image was replaced by a black one (`safety: block` and flagged)."""


# --- What the stages tell about themselves ----------------------------------------------------


@dataclass(frozen=True)
class StageInfo:
    """How a stage replica computes (what ListModels shows per stage)."""

    stage: str
    """"text_encoder", "text_encoder_t5", "vae_encoder", "denoiser", "vae_decoder" or
    "safety_checker"."""
    device: str
    dtype: str
    compile: str = "off"
    threads_small: int = 0
    """Torch threads of its small forwards (0: left as Ray set them, or a GPU stage)."""
    threads_large: int = 0
    """Torch threads of its large forwards (the Denoiser's full batches)."""


@dataclass(frozen=True)
class LoraFile:
    """An adapter file the Denoiser can load."""

    name: str
    file_bytes: int
    loaded: bool


@dataclass(frozen=True)
class ControlNetFile:
    """A ControlNet folder the Denoiser can load."""

    name: str
    file_bytes: int
    loaded: bool
    misfit: str = ""
    """Why it does not fit the model's U-Net (read from its config); "": it fits."""


@dataclass(frozen=True)
class DenoiserInfo:
    """Facts about the Denoiser's model."""

    native_width: int
    native_height: int
    vae_scale_factor: int
    unet_in_channels: int
    """4, or 9 for an inpainting model (which takes only requests with an image and a mask)."""
    family: str
    """"sd1", "sd2", "sdxl", or a diffusion transformer's: "sd3" or "flux"."""
    prediction_type: str
    loras: tuple[LoraFile, ...]
    """The model's adapter folder, read when this was made."""
    stage: StageInfo
    controlnets: tuple[ControlNetFile, ...] = ()
    """The model's ControlNet folder, read when this was made."""

    @property
    def native_size(self) -> tuple[int, int]:
        """(width, height) in pixels."""
        return self.native_width, self.native_height


@dataclass(frozen=True)
class DenoiserStats:
    """A Denoiser replica's engine counters since it started (each only grows) and its load
    now; `stages.proto`'s `DenoiserStats` says what each counts."""

    waiting: int = 0
    running: int = 0
    unet_steps: int = 0
    finished: int = 0
    cancelled: int = 0
    strategy: str = ""
    unet_seconds: float = 0.0
    image_steps: int = 0
    shared_steps: int = 0
    failed: int = 0
    unet_busy_ratio: float = 0.0
    expired: int = 0
    work_ahead: int = 0
    """Image-steps left of every request waiting or running now (load shedding's queue)."""
    capacity: float = 0.0
    """Image-steps per second of the fullest batches of the last minute (0: not measured)."""
    unet_rows: int = 0
    shallow_rows: int = 0
    compiles: int = 0
    recompiles: int = 0
    interactive_work_ahead: int = 0
    """Of `work_ahead`, the interactive requests': what a new interactive request waits for."""
    paused: int = 0
    """Running requests paused now."""
    preemptions: int = 0
    """Times a running request was paused, since the service started."""
