"""The stage client that calls the stage services in this process.

Tests, the benchmarks and the GPU machine (which has torch and diffusers but no Ray) run the real
request path through it: the same `StagePath`, the same services and the same engine as
serving, minus Serve's hops: the stage messages pass as they are, tensors by reference, with
no serialization. All the services share one torch thread, so text encoding and VAE
encoding and decoding run between two U-Net steps of the Denoiser's engine, as one process's
torch work should (see `sdserve.stages.runtime.TorchThread`).
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

from sdserve.config import ModelConfig, SdserveConfig
from sdserve.errors import InvalidArgument
from sdserve.metrics import StatsLogger
from sdserve.orchestration.client import StageClient
from sdserve.stages.denoiser import DenoiserService
from sdserve.stages.messages import (
    CheckedImages,
    CheckImages,
    Decode,
    Denoise,
    Denoised,
    DenoiseEvent,
    DenoiserInfo,
    DenoiserStats,
    EncodeImage,
    EncodeText,
    ImageEncoding,
    StageInfo,
    TextEmbeddings,
)
from sdserve.stages.runtime import TorchThread, model_stages
from sdserve.stages.safety import SafetyCheckerService
from sdserve.stages.text_encoder import T5EncoderService, TextEncoderService
from sdserve.stages.vae_decoder import VaeDecoderService
from sdserve.stages.vae_encoder import VaeEncoderService


class InProcessStageClient(StageClient):
    """Calls `TextEncoderService`, `VaeEncoderService`, `DenoiserService` and
    `VaeDecoderService` directly (and a diffusion transformer's `T5EncoderService` where T5 is
    a stage of its own, the `SafetyCheckerService` where the model's `safety` is on), the
    stages a model has as on Serve (`runtime.model_stages`)."""

    def __init__(
        self,
        text_encoder: TextEncoderService,
        denoiser: DenoiserService,
        vae_decoder: VaeDecoderService,
        vae_encoder: VaeEncoderService | None = None,
        text_encoder_t5: T5EncoderService | None = None,
        safety_checker: SafetyCheckerService | None = None,
    ):
        self.text_encoder = text_encoder
        self.denoiser = denoiser
        self.vae_decoder = vae_decoder
        self.vae_encoder = vae_encoder
        """None: the model takes no image inputs (SD3, FLUX)."""
        self.text_encoder_t5 = text_encoder_t5
        """None: T5 runs in the TextEncoder, or the model has none."""
        self.safety_checker = safety_checker
        """None: the model's `safety` is off."""

    @classmethod
    def from_config(
        cls,
        config: SdserveConfig,
        stats: StatsLogger | None = None,
        model: ModelConfig | None = None,
        thread: TorchThread | None = None,
    ) -> InProcessStageClient:
        """Loads `model`'s parts (default: the config's default model) onto `thread` (default:
        a new torch thread)."""
        stats = stats or StatsLogger()
        thread = thread or TorchThread("sdserve-torch")
        model = model or config.model_named()
        stages = model_stages(config, model)
        optional = {"vae_encoder": VaeEncoderService, "text_encoder_t5": T5EncoderService,
                    "safety_checker": SafetyCheckerService}  # fmt: skip
        return cls(
            TextEncoderService.from_config(config, stats, thread, model),
            DenoiserService.from_config(config, stats, thread, model),
            VaeDecoderService.from_config(config, stats, thread, model),
            **{stage: service.from_config(config, stats, thread, model)
               for stage, service in optional.items() if stage in stages},
        )  # fmt: skip

    @classmethod
    def for_every_model(
        cls, config: SdserveConfig, stats: StatsLogger | None = None
    ) -> dict[str, InProcessStageClient]:
        """One client per served model, all on one torch thread: {name: client}, the default
        model first (what `StagePath` takes)."""
        thread = TorchThread("sdserve-torch")
        return {m.name: cls.from_config(config, stats, m, thread) for m in config.served_models}

    def close(self) -> None:
        """Stops the engine and the torch thread."""
        self.denoiser.close()
        self.denoiser.torch.close()

    async def encode_text(self, req: EncodeText) -> TextEmbeddings:
        return await self.text_encoder.encode(req)

    async def encode_t5(self, req: EncodeText) -> TextEmbeddings:
        if self.text_encoder_t5 is not None:
            return await self.text_encoder_t5.encode(req)
        return await self.text_encoder.encode_t5(req)

    async def encode_image(self, req: EncodeImage) -> ImageEncoding:
        if self.vae_encoder is None:
            raise InvalidArgument("init_image", "this model takes no image inputs")
        return await self.vae_encoder.encode(req)

    async def denoise(self, req: Denoise) -> Denoised:
        return await self.denoiser.denoise(req)

    async def denoise_stream(self, req: Denoise) -> AsyncIterator[DenoiseEvent]:
        # Closed with this stream, not whenever it is collected: the engine frees the slot now.
        async with contextlib.aclosing(self.denoiser.denoise_stream(req)) as events:
            async for event in events:
                yield event

    async def decode(self, req: Decode) -> tuple[bytes, ...]:
        return await self.vae_decoder.decode(req)

    @property
    def has_safety_checker(self) -> bool:
        return self.safety_checker is not None

    async def check_images(self, req: CheckImages) -> CheckedImages:
        if self.safety_checker is None:
            return await super().check_images(req)
        return await self.safety_checker.check(req)

    async def denoiser_info(self) -> DenoiserInfo:
        return self.denoiser.info()

    async def stage_infos(self) -> list[StageInfo]:
        stages = [self.text_encoder, self.text_encoder_t5, self.vae_encoder]
        safety = [self.safety_checker.info()] if self.safety_checker is not None else []
        return [*(s.info() for s in stages if s is not None), self.denoiser.info().stage,
                self.vae_decoder.info(), *safety]  # fmt: skip

    async def denoiser_stats(self) -> DenoiserStats:
        return self.denoiser.stats_message()
