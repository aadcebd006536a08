"""The TextEncoder stage: EncodeTextRequest -> EncodeTextResponse (CLIP embeddings)."""

from __future__ import annotations

from sdserve.pipeline.text import TextEncoder
from sdserve.stages.runtime import OneCallStage
from sdserve.stages.tensors import tensor_to_pb
from sdserve.v1 import stages_pb2


class TextEncoderService(OneCallStage):
    """Tokenizes and encodes prompts on its torch thread (`tokenizer/`, `text_encoder/`)."""

    part_cls, stage = TextEncoder, "text_encoder"

    def _encode(self, req: stages_pb2.EncodeTextRequest) -> stages_pb2.EncodeTextResponse:
        cond, uncond = self.part.encode(req.prompt, req.negative_prompt, req.with_uncond)
        reply = stages_pb2.EncodeTextResponse(cond=tensor_to_pb(cond))
        if uncond is not None:
            reply.uncond.CopyFrom(tensor_to_pb(uncond))
        return reply

    async def encode(self, req: stages_pb2.EncodeTextRequest) -> stages_pb2.EncodeTextResponse:
        """The prompt's embeddings, and the negative prompt's when `with_uncond`."""
        return await self._run(self._encode, req)
