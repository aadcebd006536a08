"""The TextEncoder stage: EncodeText -> TextEmbeddings (CLIP embeddings), and for SD3 and FLUX
the T5 stage (`T5EncoderService`, or `TextEncoderService.encode_t5` where the TextEncoder runs
T5 itself)."""

from __future__ import annotations

import functools
from pathlib import Path

from sdserve.config import ModelConfig, SdserveConfig
from sdserve.constants import DIT_FAMILIES, resolve_model_dir
from sdserve.errors import FailedPrecondition
from sdserve.pipeline import models
from sdserve.pipeline.dit_text import ClipEncoders, T5Encoder
from sdserve.pipeline.lora import load_lora
from sdserve.pipeline.text import TextEncoder
from sdserve.stages.batching import CallBatcher
from sdserve.stages.loras import Adapters
from sdserve.stages.messages import EncodeText, TextEmbeddings
from sdserve.stages.runtime import OneCallStage
from sdserve.stages.tensors import returned


def text_encoder_part(path: str | Path, device: str = "auto", dtype: str = "auto", *,
                      allow_pickle: bool = False, with_t5: bool = True):  # fmt: skip
    """The text-encoder part of the model at `path`: a `TextEncoder` (SD 1.x/2.x, SDXL), or
    the `ClipEncoders` of a diffusion transformer (with its T5 unless `with_t5` is False)."""
    if models.model_family(path) in DIT_FAMILIES:
        return ClipEncoders(path, device, dtype, allow_pickle=allow_pickle, with_t5=with_t5)
    return TextEncoder(path, device, dtype, allow_pickle=allow_pickle)


def _embeddings(e) -> TextEmbeddings:
    return TextEmbeddings(returned(e.cond), returned(e.uncond), returned(e.pooled),
                          returned(e.uncond_pooled))  # fmt: skip


class TextEncoderService(OneCallStage):
    """Tokenizes and encodes prompts on its torch thread (`tokenizer/`, `text_encoder/`, and
    SDXL's and SD3's `tokenizer_2/`, `text_encoder_2/`; a diffusion transformer's T5 too unless
    `stages.text_encoder_t5` runs it)."""

    part_cls, stage = staticmethod(text_encoder_part), "text_encoder"
    adapters: Adapters | None = None
    """The model's LoRA adapters (their text-encoder weights), once configured."""

    @classmethod
    def part_kwargs(cls, config: SdserveConfig, model: ModelConfig) -> dict:
        """A diffusion transformer's T5 runs here unless it has a stage of its own."""
        if models.model_family(resolve_model_dir(model.path)) not in DIT_FAMILIES:
            return {}
        return {"with_t5": config.stage("text_encoder_t5", model) is None}

    def configure(self, config: SdserveConfig, model: ModelConfig) -> None:
        self.max_batch = config.engine.max_batch_size
        if not isinstance(self.part, TextEncoder):
            return  # no LoRA adapters on the diffusion transformers in this version

        def load(path, name):
            return load_lora(path, name, text_encoder=self.part.model,
                             text_encoder_2=self.part.model_2)  # fmt: skip

        self.adapters = Adapters.for_model(config, model, load)

    def _encode(self, req: EncodeText) -> TextEmbeddings:
        loras = self.adapters.resolve(req.loras) if req.loras and self.adapters else ()
        return _embeddings(self.part.encode(req.prompt, req.negative_prompt, req.with_uncond,
                                            loras))  # fmt: skip

    @functools.cached_property
    def _clip_calls(self) -> CallBatcher:
        """A diffusion transformer's CLIP encodes, batched across requests."""
        return self.batcher(
            lambda reqs: [_embeddings(e) for e in self.part.encode_many(list(map(_texts, reqs)))]
        )

    @functools.cached_property
    def _t5_calls(self) -> CallBatcher:
        """T5 encodes, batched across requests of one T5 length."""
        return self.batcher(lambda reqs: _t5_many(self.part.encode_t5_many, reqs),
                            key=lambda req: req.max_sequence_length)  # fmt: skip

    async def encode(self, req: EncodeText) -> TextEmbeddings:
        """The prompt's embeddings, and the negative prompt's when `with_uncond` (a diffusion
        transformer's batched with the other requests waiting)."""
        if isinstance(self.part, ClipEncoders):
            return await self._clip_calls(req)
        return await self._run(self._encode, req)

    async def encode_t5(self, req: EncodeText) -> TextEmbeddings:
        """A diffusion transformer's T5 embeddings (cond, and uncond when `with_uncond`), where
        this stage runs T5."""
        if getattr(self.part, "t5", None) is None:
            raise FailedPrecondition("this TextEncoder runs no T5 encoder: the model is not a "
                                     "diffusion transformer, or stages.text_encoder_t5 runs "
                                     "its T5")  # fmt: skip
        return await self._t5_calls(req)


class T5EncoderService(OneCallStage):
    """A diffusion transformer's T5 encoder as a stage of its own (`stages.text_encoder_t5`)."""

    part_cls, stage = T5Encoder, "text_encoder_t5"

    def configure(self, config: SdserveConfig, model: ModelConfig) -> None:
        self.max_batch = config.engine.max_batch_size

    @functools.cached_property
    def _calls(self) -> CallBatcher:
        """T5 encodes, batched across requests of one T5 length."""
        return self.batcher(lambda reqs: _t5_many(self.part.encode_many, reqs),
                            key=lambda req: req.max_sequence_length)  # fmt: skip

    async def encode(self, req: EncodeText) -> TextEmbeddings:
        """The prompt's T5 embeddings, and the negative prompt's when `with_uncond` (batched
        with the other requests of its T5 length waiting)."""
        return await self._calls(req)


def _texts(req: EncodeText) -> tuple[str, str, bool]:
    return req.prompt, req.negative_prompt, req.with_uncond


def _t5_many(encode_many, reqs: list[EncodeText]) -> list[TextEmbeddings]:
    """`encode_many` over requests of one T5 length (the batcher's key)."""
    return [_embeddings(e) for e in encode_many(list(map(_texts, reqs)),
                                                reqs[0].max_sequence_length)]  # fmt: skip
