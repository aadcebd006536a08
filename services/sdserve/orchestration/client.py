"""The interface between the request path and the stages."""

from __future__ import annotations

import abc
from collections.abc import AsyncIterator

from sdserve.v1 import stages_pb2


class StageClient(abc.ABC):
    """Calls the stages with their stage messages (protos/sdserve/v1/stages.proto).

    Contract, for every implementation:
    - each call may run concurrently with any other;
    - cancelling the awaiting task (or closing `denoise_stream`'s iterator early) cancels the
      stage's work: a cancelled denoise leaves the Denoiser's batch at its next step;
    - errors the stages raise reach the caller as `sdserve.errors.SdserveError`s where the
      stage raised one (DEADLINE_EXCEEDED for a dropped request, INVALID_ARGUMENT, ...).
    """

    @abc.abstractmethod
    async def encode_text(self, req: stages_pb2.EncodeTextRequest) -> stages_pb2.EncodeTextResponse:
        """The TextEncoder: the prompt's (and negative prompt's) embeddings."""

    @abc.abstractmethod
    async def encode_image(
        self, req: stages_pb2.EncodeImageRequest
    ) -> stages_pb2.EncodeImageResponse:
        """The VaeEncoder: the init image's (and masked image's) VAE posterior, and the mask."""

    @abc.abstractmethod
    async def denoise(self, req: stages_pb2.DenoiseRequest) -> stages_pb2.DenoiseResponse:
        """The Denoiser: the final latents of every image."""

    @abc.abstractmethod
    def denoise_stream(
        self, req: stages_pb2.DenoiseRequest
    ) -> AsyncIterator[stages_pb2.DenoiseEvent]:
        """The Denoiser with progress: queued, one step event per step, then done."""

    @abc.abstractmethod
    async def decode(self, req: stages_pb2.DecodeRequest) -> stages_pb2.DecodeResponse:
        """The VaeDecoder: one PNG per latent."""

    @abc.abstractmethod
    async def denoiser_info(self) -> stages_pb2.DenoiserInfo:
        """Facts about the Denoiser's model (its native size); also a health check."""

    @abc.abstractmethod
    async def stage_infos(self) -> list[stages_pb2.StageInfo]:
        """How each stage computes (device, dtype, compile mode), in request order:
        text_encoder, vae_encoder, denoiser, vae_decoder."""

    @abc.abstractmethod
    async def denoiser_stats(self) -> stages_pb2.DenoiserStats:
        """A Denoiser's counters and load (with several replicas, the one the call reaches)."""
