"""The TextEncoder deployment: EncodeTextRequest -> EncodeTextResponse."""

from __future__ import annotations

from ray import serve

from sdserve.config import SdserveConfig
from sdserve.deployments._common import TorchThread, load_stage
from sdserve.metrics import Metrics
from sdserve.pipeline.text import TextEncoder
from sdserve.types import tensor_to_pb
from sdserve.v1 import stages_pb2


@serve.deployment(name="TextEncoder")
class TextEncoderDeployment:
    def __init__(self, config: dict):
        self.torch = TorchThread("text-encoder")
        self.metrics = Metrics(SdserveConfig.model_validate(config).metrics.enabled)
        self.encoder = self.torch.call(
            load_stage, TextEncoder, config, "text_encoder", self.metrics
        )

    def _encode(self, request: bytes) -> bytes:
        req = stages_pb2.EncodeTextRequest.FromString(request)
        cond, uncond = self.encoder.encode(req.prompt, req.negative_prompt, req.with_uncond)
        reply = stages_pb2.EncodeTextResponse(cond=tensor_to_pb(cond))
        if uncond is not None:
            reply.uncond.CopyFrom(tensor_to_pb(uncond))
        return reply.SerializeToString()

    async def Encode(self, request: bytes) -> bytes:
        """Serialized `EncodeTextRequest` -> serialized `EncodeTextResponse`."""
        return await self.torch.run(self._encode, request)
