"""The VaeDecoder deployment: DecodeRequest -> DecodeResponse (PNGs)."""

from __future__ import annotations

from ray import serve

from sdserve.config import SdserveConfig
from sdserve.deployments._common import TorchThread, load_stage
from sdserve.metrics import Metrics
from sdserve.pipeline.vae import VaeDecoder
from sdserve.types import tensor_from_pb
from sdserve.v1 import stages_pb2


@serve.deployment(name="VaeDecoder")
class VaeDecoderDeployment:
    def __init__(self, config: dict):
        self.torch = TorchThread("vae-decoder")
        self.metrics = Metrics(SdserveConfig.model_validate(config).metrics.enabled)
        self.decoder = self.torch.call(load_stage, VaeDecoder, config, "vae_decoder", self.metrics)

    def _decode(self, request: bytes) -> bytes:
        req = stages_pb2.DecodeRequest.FromString(request)
        pngs = self.decoder.decode_png(tensor_from_pb(req.latents), list(req.parameters))
        return stages_pb2.DecodeResponse(png=pngs).SerializeToString()

    async def Decode(self, request: bytes) -> bytes:
        """Serialized `DecodeRequest` -> serialized `DecodeResponse`."""
        return await self.torch.run(self._decode, request)
