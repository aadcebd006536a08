"""The stage client that calls the stage deployments through Serve's deployment handles."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass

from ray.serve.handle import DeploymentHandle

from sdserve.errors import InvalidArgument
from sdserve.orchestration.client import StageClient
from sdserve.serve import _ray
from sdserve.serve import stage_messages as sm
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
from sdserve.v1 import stages_pb2


@dataclass(frozen=True)
class StageHandles:
    """One served model's stage deployments (what the ingress and the job worker take, one per
    model): bound deployments while `sdserve.serve.app` builds the graph, their handles once
    Serve has deployed them (it swaps each one nested in a replica's arguments for its handle).
    """

    text_encoder: DeploymentHandle
    denoiser: DeploymentHandle
    vae_decoder: DeploymentHandle
    vae_encoder: DeploymentHandle | None = None
    """None for a family with no image inputs (SD3, FLUX): nothing calls it."""
    text_encoder_t5: DeploymentHandle | None = None
    """SD3 and FLUX with `stages.text_encoder_t5`: T5 as a deployment of its own. None: the
    TextEncoder runs T5 (its `EncodeT5`), or the model has no T5."""
    safety_checker: DeploymentHandle | None = None
    """A model with `safety: flag | block`: its SafetyChecker, after the VaeDecoder. None: the
    model's images are not checked."""


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
    """Serializes the stage messages (`sdserve.serve.stage_messages`) and calls a model's
    TextEncoder (and TextEncoderT5), VaeEncoder, Denoiser and VaeDecoder deployments, over
    Serve's gRPC transport or Ray actor calls (`server.stage_transport`); parses their replies
    back."""

    def __init__(self, stages: StageHandles, transport: str = "grpc"):
        def handle(deployment: DeploymentHandle | None) -> DeploymentHandle | None:
            return None if deployment is None else _ray.with_transport(deployment, transport)

        self._text = handle(stages.text_encoder)
        self._t5 = handle(stages.text_encoder_t5)
        self._vae_encoder = handle(stages.vae_encoder)
        self._denoiser = handle(stages.denoiser)
        self._denoiser_stream = self._denoiser.options(stream=True)
        self._vae = handle(stages.vae_decoder)
        self._safety = handle(stages.safety_checker)
        # T5 in a deployment of its own, else in the TextEncoder (a U-Net model's TextEncoder
        # refuses the call: the request path makes it only for SD3 and FLUX).
        self._encode_t5 = self._t5.Encode if self._t5 is not None else self._text.EncodeT5

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

    async def encode_t5(self, req: EncodeText) -> TextEmbeddings:
        reply = await self._call(self._encode_t5, sm.encode_text_to_pb(req),
                                 stages_pb2.EncodeTextResponse)  # fmt: skip
        return sm.embeddings_from_pb(reply)

    async def encode_image(self, req: EncodeImage) -> ImageEncoding:
        if self._vae_encoder is None:  # the request path refuses such requests before this
            raise InvalidArgument("init_image", "this model's family takes no image inputs "
                                  "(it has no VaeEncoder deployment)")  # fmt: skip
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

    @property
    def has_safety_checker(self) -> bool:
        return self._safety is not None

    async def check_images(self, req: CheckImages) -> CheckedImages:
        if self._safety is None:
            return await super().check_images(req)
        reply = await self._call(self._safety.Check, sm.check_images_to_pb(req),
                                 stages_pb2.CheckImagesResponse)  # fmt: skip
        return sm.checked_from_pb(reply)

    async def denoiser_info(self) -> DenoiserInfo:
        raw = await self._denoiser.Info.remote(b"")
        return sm.denoiser_info_from_pb(stages_pb2.DenoiserInfo.FromString(raw))

    async def stage_infos(self) -> list[StageInfo]:
        """Every deployment of the model, in request order: text_encoder, text_encoder_t5
        (where T5 has its own), vae_encoder (where the family takes images), denoiser,
        vae_decoder, safety_checker (where the model's `safety` is on). A U-Net model's are
        the four of `StageClient.stage_infos`."""
        stages = [self._text, self._t5, self._vae_encoder, self._denoiser, self._vae,
                  self._safety]  # fmt: skip
        stages = [stage for stage in stages if stage is not None]
        raws = await asyncio.gather(*(stage.Info.remote(b"") for stage in stages))
        return [
            sm.stage_info_from_pb(stages_pb2.DenoiserInfo.FromString(raw).stage)
            if stage is self._denoiser
            else sm.stage_info_from_pb(stages_pb2.StageInfo.FromString(raw))
            for stage, raw in zip(stages, raws, strict=True)
        ]

    async def denoiser_stats(self) -> DenoiserStats:
        raw = await self._denoiser.Stats.remote(b"")
        return sm.denoiser_stats_from_pb(stages_pb2.DenoiserStats.FromString(raw))


def stage_clients(models: dict[str, StageHandles], transport: str) -> dict[str, ServeStageClient]:
    """A stage client per served model: {name: client}, in the same order."""
    return {name: ServeStageClient(handles, transport) for name, handles in models.items()}
