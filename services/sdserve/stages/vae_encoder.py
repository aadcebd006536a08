"""The VaeEncoder stage: EncodeImageRequest -> EncodeImageResponse (image-to-image, inpainting).

It returns the VAE posterior's moments of the init image (and of the masked image), not a
sample: each image of the request samples them in the Denoiser with its own seeded generator,
so one encoding serves every image, and a request's images equal diffusers' for their seeds.
"""

from __future__ import annotations

from sdserve.pipeline.images import EncodedImage, VaeEncoder
from sdserve.stages.runtime import OneCallStage
from sdserve.stages.tensors import tensor_from_pb, tensor_to_pb
from sdserve.v1 import stages_pb2


class VaeEncoderService(OneCallStage):
    """Decodes the image bytes and runs the VAE encoder on its torch thread (`vae/`)."""

    part_cls, stage = VaeEncoder, "vae_encoder"

    def _encode(self, req: stages_pb2.EncodeImageRequest) -> stages_pb2.EncodeImageResponse:
        return encoded_to_pb(self.part.encode(req.init_image, req.mask_image))

    async def encode(self, req: stages_pb2.EncodeImageRequest) -> stages_pb2.EncodeImageResponse:
        """The init image's posterior moments; with a mask, the masked image's and the mask."""
        return await self._run(self._encode, req)


def encoded_to_pb(encoded: EncodedImage) -> stages_pb2.EncodeImageResponse:
    reply = stages_pb2.EncodeImageResponse(
        image=tensor_to_pb(encoded.image), scaling_factor=encoded.scaling_factor
    )
    if encoded.mask is not None:
        reply.masked_image.CopyFrom(tensor_to_pb(encoded.masked))
        reply.mask.CopyFrom(tensor_to_pb(encoded.mask))
    return reply


def encoded_from_pb(msg: stages_pb2.EncodeImageResponse) -> EncodedImage:
    has_mask = msg.HasField("mask")
    return EncodedImage(
        image=tensor_from_pb(msg.image),
        scaling_factor=msg.scaling_factor,
        masked=tensor_from_pb(msg.masked_image) if has_mask else None,
        mask=tensor_from_pb(msg.mask) if has_mask else None,
    )
