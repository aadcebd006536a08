"""The interface between the request path and the stages."""

from __future__ import annotations

import abc
from collections.abc import AsyncIterator

from sdserve.stages.messages import (
    CheckedImages,
    CheckImages,
    Decode,
    Denoise,
    Denoised,
    DenoiseEvent,
    DenoiserInfo,
    DenoiserStats,
    EncodeImage,
    EncodeText,
    ImageEncoding,
    StageInfo,
    TextEmbeddings,
)


class StageClient(abc.ABC):
    """Calls the stages with their stage messages (`sdserve.stages.messages`, the domain form of
    protos/sdserve/v1/stages.proto).

    Contract, for every implementation:
    - each call may run concurrently with any other;
    - cancelling the awaiting task (or closing `denoise_stream`'s iterator early) cancels the
      stage's work: a cancelled denoise leaves the Denoiser's batch at its next step;
    - errors the stages raise reach the caller as `sdserve.errors.SdserveError`s where the
      stage raised one (DEADLINE_EXCEEDED for a dropped request, INVALID_ARGUMENT, ...);
    - a tensor in a reply is the caller's, and a tensor in a request is not changed.
    """

    @abc.abstractmethod
    async def encode_text(self, req: EncodeText) -> TextEmbeddings:
        """The TextEncoder: the prompt's (and negative prompt's) embeddings."""

    @abc.abstractmethod
    async def encode_t5(self, req: EncodeText) -> TextEmbeddings:
        """SD3 and FLUX: the T5 embeddings (`cond`, and `uncond` with `with_uncond`), from the
        T5 stage (`stages.text_encoder_t5`) or, where it has none, from the TextEncoder."""

    @abc.abstractmethod
    async def encode_image(self, req: EncodeImage) -> ImageEncoding:
        """The VaeEncoder: the init image's (and masked image's) VAE posterior, and the mask."""

    @abc.abstractmethod
    async def denoise(self, req: Denoise) -> Denoised:
        """The Denoiser: the final latents of every image."""

    @abc.abstractmethod
    def denoise_stream(self, req: Denoise) -> AsyncIterator[DenoiseEvent]:
        """The Denoiser with progress: queued, one step event per step, then done."""

    @abc.abstractmethod
    async def decode(self, req: Decode) -> tuple[bytes, ...]:
        """The VaeDecoder: one PNG per latent."""

    @property
    def has_safety_checker(self) -> bool:
        """Whether the model has a SafetyChecker stage (its `safety` is flag or block)."""
        return False

    async def check_images(self, req: CheckImages) -> CheckedImages:
        """The SafetyChecker: each image's verdict and the image to return (black where
        blocked). Only for a model that `has_safety_checker`."""
        raise NotImplementedError("this model has no safety checker stage")

    @abc.abstractmethod
    async def denoiser_info(self) -> DenoiserInfo:
        """Facts about the Denoiser's model (its native size); also a health check."""

    @abc.abstractmethod
    async def stage_infos(self) -> list[StageInfo]:
        """How each stage computes (device, dtype, compile mode), in request order:
        text_encoder, vae_encoder, denoiser, vae_decoder. Where the model has them apart, an
        SD3 or FLUX model's T5 stage (text_encoder_t5) comes after text_encoder; a model
        without a vae_encoder stage (SD3, FLUX served by Serve) lists none; a model with a
        safety checker lists it last (safety_checker)."""

    @abc.abstractmethod
    async def denoiser_stats(self) -> DenoiserStats:
        """A Denoiser's counters and load (with several replicas, the one the call reaches)."""
