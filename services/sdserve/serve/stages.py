"""The stage deployments: thin shells that parse a stage message (its protobuf bytes, into the
domain form, `sdserve.serve.stage_messages`), call the stage service (`sdserve.stages`) and
serialize its answer. Serve routes calls by method name.

Each served model has its own deployments (`sdserve.serve.app`: TextEncoder, Denoiser,
VaeDecoder; VaeEncoder where its family takes images; TextEncoderT5 where an SD3 or FLUX model
runs T5 apart; SafetyChecker where its `safety` is on); a replica is given the whole config
tree and the name of its model.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from ray import serve

from sdserve.metrics import StatsLogger
from sdserve.serve import stage_messages as sm
from sdserve.serve.common import replica_setup
from sdserve.stages.denoiser import DenoiserService
from sdserve.stages.safety import SafetyCheckerService
from sdserve.stages.text_encoder import T5EncoderService, TextEncoderService
from sdserve.stages.vae_decoder import VaeDecoderService
from sdserve.stages.vae_encoder import VaeEncoderService
from sdserve.v1 import stages_pb2


class _OneCallDeployment:
    """What the TextEncoder(s), VaeEncoder and VaeDecoder deployments share: the replica loads
    its `service_cls` (a `sdserve.stages.runtime.OneCallStage`) and answers `Info`."""

    service_cls: type

    def __init__(self, config: dict, model: str):
        tree, stats = replica_setup(config, model)
        self.service = self.service_cls.from_config(tree, stats, model=tree.model_named(model))

    def Info(self, request: bytes = b"") -> bytes:
        """Serialized `StageInfo`: how this stage computes."""
        return sm.stage_info_to_pb(self.service.info()).SerializeToString()


async def _encode_text(encode, request: bytes) -> bytes:
    """Serialized `EncodeTextRequest` -> `encode` -> serialized `EncodeTextResponse`."""
    req = sm.encode_text_from_pb(stages_pb2.EncodeTextRequest.FromString(request))
    return sm.embeddings_to_pb(await encode(req)).SerializeToString()


@serve.deployment(name="TextEncoder")
class TextEncoderDeployment(_OneCallDeployment):
    service_cls = TextEncoderService

    async def Encode(self, request: bytes) -> bytes:
        """Serialized `EncodeTextRequest` -> serialized `EncodeTextResponse`."""
        return await _encode_text(self.service.encode, request)

    async def EncodeT5(self, request: bytes) -> bytes:
        """SD3 and FLUX, where this deployment runs T5: serialized `EncodeTextRequest` ->
        serialized `EncodeTextResponse` of T5 embeddings."""
        return await _encode_text(self.service.encode_t5, request)


@serve.deployment(name="TextEncoderT5")
class TextEncoderT5Deployment(_OneCallDeployment):
    """SD3 and FLUX with `stages.text_encoder_t5`: their T5 encoder as a deployment of its own."""

    service_cls = T5EncoderService

    async def Encode(self, request: bytes) -> bytes:
        """Serialized `EncodeTextRequest` -> serialized `EncodeTextResponse` (T5 embeddings)."""
        return await _encode_text(self.service.encode, request)


@serve.deployment(name="Denoiser")
class DenoiserDeployment:
    async def __init__(self, config: dict, model: str):
        tree, stats = replica_setup(config, model)
        self.service = DenoiserService.from_config(tree, stats, model=tree.model_named(model))
        self._refresh = asyncio.get_running_loop().create_task(_refresh_every(stats, 2.0))

    def __del__(self):  # Serve is removing the replica
        self.service.close()

    async def Denoise(self, request: bytes) -> bytes:
        """Serialized `DenoiseRequest` -> serialized `DenoiseResponse`."""
        req = sm.denoise_from_pb(stages_pb2.DenoiseRequest.FromString(request))
        return sm.denoised_to_pb(await self.service.denoise(req)).SerializeToString()

    async def DenoiseStream(self, request: bytes) -> AsyncIterator[bytes]:
        """Serialized `DenoiseRequest` -> serialized `DenoiseEvent`s: queued, steps, done."""
        req = sm.denoise_from_pb(stages_pb2.DenoiseRequest.FromString(request))
        async for event in self.service.denoise_stream(req):
            yield sm.denoise_event_to_pb(event).SerializeToString()

    def Info(self, request: bytes = b"") -> bytes:
        """Serialized `DenoiserInfo`: the model's native size and latent scale."""
        return sm.denoiser_info_to_pb(self.service.info()).SerializeToString()

    def Stats(self, request: bytes = b"") -> bytes:
        """Serialized `DenoiserStats` of this replica."""
        return sm.denoiser_stats_to_pb(self.service.stats_message()).SerializeToString()


@serve.deployment(name="VaeDecoder")
class VaeDecoderDeployment(_OneCallDeployment):
    service_cls = VaeDecoderService

    async def Decode(self, request: bytes) -> bytes:
        """Serialized `DecodeRequest` -> serialized `DecodeResponse`."""
        req = sm.decode_from_pb(stages_pb2.DecodeRequest.FromString(request))
        return sm.pngs_to_pb(await self.service.decode(req)).SerializeToString()


@serve.deployment(name="VaeEncoder")
class VaeEncoderDeployment(_OneCallDeployment):
    service_cls = VaeEncoderService

    async def Encode(self, request: bytes) -> bytes:
        """Serialized `EncodeImageRequest` -> serialized `EncodeImageResponse`."""
        req = sm.encode_image_from_pb(stages_pb2.EncodeImageRequest.FromString(request))
        return sm.encoded_to_pb(await self.service.encode(req)).SerializeToString()


@serve.deployment(name="SafetyChecker")
class SafetyCheckerDeployment(_OneCallDeployment):
    """A model with `safety: flag | block`: its safety checker, after the VaeDecoder."""

    service_cls = SafetyCheckerService

    async def Check(self, request: bytes) -> bytes:
        """Serialized `CheckImagesRequest` -> serialized `CheckImagesResponse`."""
        req = sm.check_images_from_pb(stages_pb2.CheckImagesRequest.FromString(request))
        return sm.checked_to_pb(await self.service.check(req)).SerializeToString()


async def _refresh_every(stats: StatsLogger, seconds: float) -> None:
    """Keeps the time-based gauges current while the engine idles."""
    while True:
        await asyncio.sleep(seconds)
        stats.refresh()
