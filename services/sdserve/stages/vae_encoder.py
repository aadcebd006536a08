"""The VaeEncoder stage: EncodeImage -> ImageEncoding (image-to-image, inpainting).

It returns the VAE posterior's moments of the init image (and of the masked image), not a
sample: each image of the request samples them in the Denoiser with its own seeded generator,
so one encoding serves every image, and a request's images equal diffusers' for their seeds.
"""

from __future__ import annotations

from sdserve.pipeline.images import VaeEncoder
from sdserve.stages.messages import EncodeImage, ImageEncoding
from sdserve.stages.runtime import OneCallStage
from sdserve.stages.tensors import returned


class VaeEncoderService(OneCallStage):
    """Decodes the image bytes and runs the VAE encoder on its torch thread (`vae/`)."""

    part_cls, stage = VaeEncoder, "vae_encoder"

    def _encode(self, req: EncodeImage) -> ImageEncoding:
        e = self.part.encode(req.init_image, req.mask_image)
        return ImageEncoding(returned(e.image), e.scaling_factor, returned(e.masked),
                             returned(e.mask))  # fmt: skip

    async def encode(self, req: EncodeImage) -> ImageEncoding:
        """The init image's posterior moments; with a mask, the masked image's and the mask."""
        return await self._run(self._encode, req)
