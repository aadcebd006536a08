"""The TextEncoder stage: EncodeTextRequest -> EncodeTextResponse (CLIP embeddings)."""

from __future__ import annotations

from sdserve.config import ModelConfig, SdserveConfig
from sdserve.pipeline.lora import load_lora
from sdserve.pipeline.text import TextEncoder
from sdserve.stages.loras import Adapters
from sdserve.stages.runtime import OneCallStage
from sdserve.stages.tensors import tensor_to_pb
from sdserve.v1 import stages_pb2


class TextEncoderService(OneCallStage):
    """Tokenizes and encodes prompts on its torch thread (`tokenizer/`, `text_encoder/`, and
    SDXL's `tokenizer_2/`, `text_encoder_2/`)."""

    part_cls, stage = TextEncoder, "text_encoder"
    adapters: Adapters | None = None
    """The model's LoRA adapters (their text-encoder weights), once configured."""

    def configure(self, config: SdserveConfig, model: ModelConfig) -> None:
        def load(path, name):
            return load_lora(path, name, text_encoder=self.part.model,
                             text_encoder_2=self.part.model_2)  # fmt: skip

        self.adapters = Adapters.for_model(config, model, load)

    def _encode(self, req: stages_pb2.EncodeTextRequest) -> stages_pb2.EncodeTextResponse:
        loras = self.adapters.resolve(req.loras) if req.loras and self.adapters else ()
        embeddings = self.part.encode(req.prompt, req.negative_prompt, req.with_uncond, loras)
        reply = stages_pb2.EncodeTextResponse()
        for name, field in (("cond", "cond"), ("uncond", "uncond"), ("pooled", "cond_pooled"),
                            ("uncond_pooled", "uncond_pooled")):  # fmt: skip
            tensor = getattr(embeddings, name)
            if tensor is not None:
                getattr(reply, field).CopyFrom(tensor_to_pb(tensor))
        return reply

    async def encode(self, req: stages_pb2.EncodeTextRequest) -> stages_pb2.EncodeTextResponse:
        """The prompt's embeddings, and the negative prompt's when `with_uncond`."""
        return await self._run(self._encode, req)
