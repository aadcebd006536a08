"""The stage client that calls the stage deployments through Serve's deployment handles."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import NamedTuple

from ray.serve.handle import DeploymentHandle

from sdserve.orchestration.client import StageClient
from sdserve.serve import _ray
from sdserve.serve import stage_messages as sm
from sdserve.stages.messages import (
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
from sdserve.v1 import stages_pb2


class StageHandles(NamedTuple):
    """The stage deployments' handles, bound together (what the ingress and job worker take)."""

    text_encoder: DeploymentHandle
    denoiser: DeploymentHandle
    vae_decoder: DeploymentHandle
    vae_encoder: DeploymentHandle


@contextlib.contextmanager
def cancel_on_exit(response):
    """Cancels a stage call when the block is left early (the caller was cancelled, or its
    deadline passed). Serve's own propagation of a cancelled request to its child calls is best
    effort; measured here, it missed about half the streaming Denoiser calls."""
    finished = False
    try:
        yield
        finished = True
    finally:
        if not finished:
            response.cancel()


class ServeStageClient(StageClient):
    """Serializes the stage messages (`sdserve.serve.stage_messages`) and calls the
    TextEncoder, VaeEncoder, Denoiser and VaeDecoder deployments, over Serve's gRPC transport
    or Ray actor calls (`server.stage_transport`); parses their replies back."""

    def __init__(
        self,
        stages: StageHandles,
        transport: str = "grpc",
    ):
        text_encoder, denoiser, vae_decoder, vae_encoder = stages
        self._text = _ray.with_transport(text_encoder, transport)
        self._vae_encoder = _ray.with_transport(vae_encoder, transport)
        self._denoiser = _ray.with_transport(denoiser, transport)
        self._denoiser_stream = self._denoiser.options(stream=True)
        self._vae = _ray.with_transport(vae_decoder, transport)

    @staticmethod
    async def _call(method, request, reply_type):
        """Sends a protobuf request to a deployment's method; its reply, parsed."""
        response = method.remote(request.SerializeToString())
        with cancel_on_exit(response):
            return reply_type.FromString(await response)

    async def encode_text(self, req: EncodeText) -> TextEmbeddings:
        reply = await self._call(self._text.Encode, sm.encode_text_to_pb(req),
                                 stages_pb2.EncodeTextResponse)  # fmt: skip
        return sm.embeddings_from_pb(reply)

    async def encode_image(self, req: EncodeImage) -> ImageEncoding:
        reply = await self._call(self._vae_encoder.Encode, sm.encode_image_to_pb(req),
                                 stages_pb2.EncodeImageResponse)  # fmt: skip
        return sm.encoded_from_pb(reply)

    async def denoise(self, req: Denoise) -> Denoised:
        reply = await self._call(self._denoiser.Denoise, sm.denoise_to_pb(req),
                                 stages_pb2.DenoiseResponse)  # fmt: skip
        return sm.denoised_from_pb(reply)

    async def denoise_stream(self, req: Denoise) -> AsyncIterator[DenoiseEvent]:
        events = self._denoiser_stream.DenoiseStream.remote(
            sm.denoise_to_pb(req).SerializeToString()
        )
        with cancel_on_exit(events):
            async for raw in events:
                yield sm.denoise_event_from_pb(stages_pb2.DenoiseEvent.FromString(raw))

    async def decode(self, req: Decode) -> tuple[bytes, ...]:
        reply = await self._call(self._vae.Decode, sm.decode_to_pb(req), stages_pb2.DecodeResponse)
        return sm.pngs_from_pb(reply)

    async def denoiser_info(self) -> DenoiserInfo:
        raw = await self._denoiser.Info.remote(b"")
        return sm.denoiser_info_from_pb(stages_pb2.DenoiserInfo.FromString(raw))

    async def stage_infos(self) -> list[StageInfo]:
        text, image, denoiser, vae = await asyncio.gather(
            self._text.Info.remote(b""), self._vae_encoder.Info.remote(b""),
            self._denoiser.Info.remote(b""), self._vae.Info.remote(b""),
        )  # fmt: skip

        def info(raw: bytes) -> StageInfo:
            return sm.stage_info_from_pb(stages_pb2.StageInfo.FromString(raw))

        denoiser_stage = stages_pb2.DenoiserInfo.FromString(denoiser).stage
        return [info(text), info(image), sm.stage_info_from_pb(denoiser_stage), info(vae)]

    async def denoiser_stats(self) -> DenoiserStats:
        raw = await self._denoiser.Stats.remote(b"")
        return sm.denoiser_stats_from_pb(stages_pb2.DenoiserStats.FromString(raw))


def stage_clients(models: dict[str, StageHandles], transport: str) -> dict[str, ServeStageClient]:
    """A stage client per served model: {name: client}, in the same order."""
    return {name: ServeStageClient(StageHandles(*handles), transport)
            for name, handles in models.items()}  # fmt: skip
