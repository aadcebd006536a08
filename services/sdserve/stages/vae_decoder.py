"""The VaeDecoder stage: Decode -> one PNG per latent."""

from __future__ import annotations

from sdserve.pipeline.vae import VaeDecoder
from sdserve.stages.messages import Decode
from sdserve.stages.runtime import OneCallStage
from sdserve.stages.tensors import unpack


class VaeDecoderService(OneCallStage):
    """Decodes latents and PNG-encodes the images on its torch thread (`vae/`)."""

    part_cls, stage = VaeDecoder, "vae_decoder"

    def _decode(self, req: Decode) -> tuple[bytes, ...]:
        return tuple(self.part.decode_png(unpack(req.latents), list(req.parameters)))

    async def decode(self, req: Decode) -> tuple[bytes, ...]:
        """One PNG per latent, each with its `parameters` text chunk."""
        return await self._run(self._decode, req)
