"""The stage deployments: thin shells that parse a stage message (its protobuf bytes, into the
domain form, `sdserve.serve.stage_messages`), call the stage service (`sdserve.stages`) and
serialize its answer. Serve routes calls by method name.

Each served model has its own four deployments (`sdserve.serve.app`); a replica is given the
whole config tree and the name of its model.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from ray import serve

from sdserve.metrics import StatsLogger
from sdserve.serve import stage_messages as sm
from sdserve.serve.common import replica_setup
from sdserve.stages.denoiser import DenoiserService
from sdserve.stages.text_encoder import TextEncoderService
from sdserve.stages.vae_decoder import VaeDecoderService
from sdserve.stages.vae_encoder import VaeEncoderService
from sdserve.v1 import stages_pb2


@serve.deployment(name="TextEncoder")
class TextEncoderDeployment:
    def __init__(self, config: dict, model: str):
        tree, stats = replica_setup(config, model)
        self.service = TextEncoderService.from_config(tree, stats, model=tree.model_named(model))

    async def Encode(self, request: bytes) -> bytes:
        """Serialized `EncodeTextRequest` -> serialized `EncodeTextResponse`."""
        req = sm.encode_text_from_pb(stages_pb2.EncodeTextRequest.FromString(request))
        return sm.embeddings_to_pb(await self.service.encode(req)).SerializeToString()

    def Info(self, request: bytes = b"") -> bytes:
        """Serialized `StageInfo`: how this stage computes."""
        return sm.stage_info_to_pb(self.service.info()).SerializeToString()


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
class VaeDecoderDeployment:
    def __init__(self, config: dict, model: str):
        tree, stats = replica_setup(config, model)
        self.service = VaeDecoderService.from_config(tree, stats, model=tree.model_named(model))

    async def Decode(self, request: bytes) -> bytes:
        """Serialized `DecodeRequest` -> serialized `DecodeResponse`."""
        req = sm.decode_from_pb(stages_pb2.DecodeRequest.FromString(request))
        return sm.pngs_to_pb(await self.service.decode(req)).SerializeToString()

    def Info(self, request: bytes = b"") -> bytes:
        """Serialized `StageInfo`: how this stage computes."""
        return sm.stage_info_to_pb(self.service.info()).SerializeToString()


@serve.deployment(name="VaeEncoder")
class VaeEncoderDeployment:
    def __init__(self, config: dict, model: str):
        tree, stats = replica_setup(config, model)
        self.service = VaeEncoderService.from_config(tree, stats, model=tree.model_named(model))

    async def Encode(self, request: bytes) -> bytes:
        """Serialized `EncodeImageRequest` -> serialized `EncodeImageResponse`."""
        req = sm.encode_image_from_pb(stages_pb2.EncodeImageRequest.FromString(request))
        return sm.encoded_to_pb(await self.service.encode(req)).SerializeToString()

    def Info(self, request: bytes = b"") -> bytes:
        """Serialized `StageInfo`: how this stage computes."""
        return sm.stage_info_to_pb(self.service.info()).SerializeToString()


async def _refresh_every(stats: StatsLogger, seconds: float) -> None:
    """Keeps the time-based gauges current while the engine idles."""
    while True:
        await asyncio.sleep(seconds)
        stats.refresh()
