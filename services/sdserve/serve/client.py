"""The stage client that calls the stage deployments through Serve's deployment handles."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import NamedTuple

from ray.serve.handle import DeploymentHandle

from sdserve.orchestration.client import StageClient
from sdserve.serve import _ray
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
    """Serializes the stage messages and calls the TextEncoder, VaeEncoder, Denoiser and
    VaeDecoder deployments, over Serve's gRPC transport or Ray actor calls
    (`server.stage_transport`)."""

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
        response = method.remote(request.SerializeToString())
        with cancel_on_exit(response):
            return reply_type.FromString(await response)

    async def encode_text(self, req: stages_pb2.EncodeTextRequest) -> stages_pb2.EncodeTextResponse:
        return await self._call(self._text.Encode, req, stages_pb2.EncodeTextResponse)

    async def encode_image(
        self, req: stages_pb2.EncodeImageRequest
    ) -> stages_pb2.EncodeImageResponse:
        return await self._call(self._vae_encoder.Encode, req, stages_pb2.EncodeImageResponse)

    async def denoise(self, req: stages_pb2.DenoiseRequest) -> stages_pb2.DenoiseResponse:
        return await self._call(self._denoiser.Denoise, req, stages_pb2.DenoiseResponse)

    async def denoise_stream(
        self, req: stages_pb2.DenoiseRequest
    ) -> AsyncIterator[stages_pb2.DenoiseEvent]:
        events = self._denoiser_stream.DenoiseStream.remote(req.SerializeToString())
        with cancel_on_exit(events):
            async for raw in events:
                yield stages_pb2.DenoiseEvent.FromString(raw)

    async def decode(self, req: stages_pb2.DecodeRequest) -> stages_pb2.DecodeResponse:
        return await self._call(self._vae.Decode, req, stages_pb2.DecodeResponse)

    async def denoiser_info(self) -> stages_pb2.DenoiserInfo:
        return stages_pb2.DenoiserInfo.FromString(await self._denoiser.Info.remote(b""))

    async def stage_infos(self) -> list[stages_pb2.StageInfo]:
        text, image, denoiser, vae = await asyncio.gather(
            self._text.Info.remote(b""), self._vae_encoder.Info.remote(b""),
            self._denoiser.Info.remote(b""), self._vae.Info.remote(b""),
        )  # fmt: skip
        info = stages_pb2.StageInfo.FromString
        return [info(text), info(image), stages_pb2.DenoiserInfo.FromString(denoiser).stage,
                info(vae)]  # fmt: skip

    async def denoiser_stats(self) -> stages_pb2.DenoiserStats:
        return stages_pb2.DenoiserStats.FromString(await self._denoiser.Stats.remote(b""))


def stage_clients(models: dict[str, StageHandles], transport: str) -> dict[str, ServeStageClient]:
    """A stage client per served model: {name: client}, in the same order."""
    return {name: ServeStageClient(StageHandles(*handles), transport)
            for name, handles in models.items()}  # fmt: skip
