"""The TextEncoder stage: EncodeText -> TextEmbeddings (CLIP embeddings)."""

from __future__ import annotations

from sdserve.config import ModelConfig, SdserveConfig
from sdserve.pipeline.lora import load_lora
from sdserve.pipeline.text import TextEncoder
from sdserve.stages.loras import Adapters
from sdserve.stages.messages import EncodeText, TextEmbeddings
from sdserve.stages.runtime import OneCallStage
from sdserve.stages.tensors import returned


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

    def _encode(self, req: EncodeText) -> TextEmbeddings:
        loras = self.adapters.resolve(req.loras) if req.loras and self.adapters else ()
        e = self.part.encode(req.prompt, req.negative_prompt, req.with_uncond, loras)
        return TextEmbeddings(returned(e.cond), returned(e.uncond), returned(e.pooled),
                              returned(e.uncond_pooled))  # fmt: skip

    async def encode(self, req: EncodeText) -> TextEmbeddings:
        """The prompt's embeddings, and the negative prompt's when `with_uncond`."""
        return await self._run(self._encode, req)
