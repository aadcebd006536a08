"""The VaeDecoder stage: Decode -> one PNG per latent."""

from __future__ import annotations

import functools

import torch

from sdserve.config import ModelConfig, SdserveConfig
from sdserve.pipeline.vae import VaeDecoder
from sdserve.stages.batching import CallBatcher
from sdserve.stages.messages import Decode
from sdserve.stages.runtime import OneCallStage
from sdserve.stages.tensors import unpack


class VaeDecoderService(OneCallStage):
    """Decodes latents and PNG-encodes the images on its torch thread (`vae/`). The requests
    waiting for it with latents of one shape decode in one batch (`CallBatcher`), unless
    `engine.batch_invariant` asks that an image never depend on its neighbours."""

    part_cls, stage = VaeDecoder, "vae_decoder"

    def configure(self, config: SdserveConfig, model: ModelConfig) -> None:
        self.max_batch = 1 if config.engine.batch_invariant else config.engine.max_batch_size

    def _decode_many(self, reqs: list[Decode]) -> list[tuple[bytes, ...]]:
        latents = [unpack(r.latents) for r in reqs]
        texts = [t for r, x in zip(reqs, latents, strict=True)
                 for t in (list(r.parameters) or [""] * len(x))]  # fmt: skip
        pngs = self.part.decode_png(torch.cat(latents), texts)
        out, i = [], 0
        for x in latents:
            out.append(tuple(pngs[i : i + len(x)]))
            i += len(x)
        return out

    @functools.cached_property
    def _calls(self) -> CallBatcher:
        return self.batcher(self._decode_many, key=lambda req: tuple(req.latents.shape[1:]))

    async def decode(self, req: Decode) -> tuple[bytes, ...]:
        """One PNG per latent, each with its `parameters` text chunk."""
        return await self._calls(req)
