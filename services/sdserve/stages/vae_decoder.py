"""The VaeDecoder stage: DecodeRequest -> DecodeResponse (one PNG per latent)."""

from __future__ import annotations

from sdserve.pipeline.vae import VaeDecoder
from sdserve.stages.runtime import OneCallStage
from sdserve.stages.tensors import tensor_from_pb
from sdserve.v1 import stages_pb2


class VaeDecoderService(OneCallStage):
    """Decodes latents and PNG-encodes the images on its torch thread (`vae/`)."""

    part_cls, stage = VaeDecoder, "vae_decoder"

    def _decode(self, req: stages_pb2.DecodeRequest) -> stages_pb2.DecodeResponse:
        pngs = self.part.decode_png(tensor_from_pb(req.latents), list(req.parameters))
        return stages_pb2.DecodeResponse(png=pngs)

    async def decode(self, req: stages_pb2.DecodeRequest) -> stages_pb2.DecodeResponse:
        """One PNG per latent, each with its `parameters` text chunk."""
        return await self._run(self._decode, req)
