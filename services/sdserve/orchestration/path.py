"""The one request path: text encoder (and VAE encoder for image inputs) -> denoiser -> VAE
decoder, over a `StageClient`.

The gRPC ingress runs it for Generate/GenerateStream and the job runner for queued jobs, so
jobs and synchronous requests share the Denoiser's running batch. It never touches a tensor:
embeddings and latents pass through as stage messages.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator

from sdserve.config import SdserveConfig
from sdserve.errors import DeadlineExceeded, Internal, InvalidArgument
from sdserve.metrics import StatsLogger
from sdserve.orchestration.client import StageClient
from sdserve.stats import RequestServed
from sdserve.types import GenerateEvent, GenerateParams, Preview, Progress, Queued, Result, Timings
from sdserve.v1 import diffusion_pb2, stages_pb2

logger = logging.getLogger(__name__)


class StagePath:
    """Runs requests through the three stages, many at a time."""

    def __init__(
        self, client: StageClient, config: SdserveConfig, stats: StatsLogger | None = None
    ):
        self.client = client
        self.config = config
        self.stats = stats or StatsLogger()
        self._info: stages_pb2.DenoiserInfo | None = None
        self._model_name = config.model.path or "sdserve-default"

    async def denoiser_info(self) -> stages_pb2.DenoiserInfo:
        """The model's native size and the like; asking it also checks the Denoiser answers."""
        if self._info is None:
            self._info = await self.client.denoiser_info()
        return self._info

    async def validate(self, request: diffusion_pb2.GenerateRequest) -> GenerateParams:
        """The request's parameters, defaults filled in. Raises InvalidArgument."""
        info = await self.denoiser_info()
        params = GenerateParams.from_pb(
            request,
            limits=self.config.limits,
            defaults=self.config.defaults,
            native_size=(info.native_width, info.native_height),
        )
        if info.unet_in_channels == 9 and not params.mask_image:
            raise InvalidArgument(
                "mask_image", "the model is an inpainting model (a 9-channel U-Net): every "
                "request needs init_image and mask_image",
            )  # fmt: skip
        return params

    async def run(
        self,
        params: GenerateParams,
        *,
        request_id: str = "",
        stream: bool = False,
        preview_every: int = 0,
        progress_interval_s: float = 0.0,
        deadline: float | None = None,
    ) -> AsyncIterator[GenerateEvent]:
        """Runs one request. With `stream` it yields Queued, a Progress per step (at most one
        every `progress_interval_s`, and always the last), a Preview every `preview_every`
        steps, then the Result; without, only the Result. Closing the iterator early cancels
        the stage call in flight."""
        started = time.perf_counter()
        request_id = request_id or uuid.uuid4().hex
        logger.info(
            "request %s: %dx%d, %d steps of %s, guidance %g, %d image(s), seed %d",
            request_id, params.width, params.height, params.steps, params.scheduler,
            params.guidance_scale, params.num_images, params.seed,
        )  # fmt: skip

        # 1. Encode the prompt (and the negative prompt when guidance is on), and any image
        #    input at the same time.
        _check(deadline, request_id, "before the text encoder")
        (encoded, text_s), (init, image_s) = await asyncio.gather(
            _timed(self._encode_text(params, request_id)),
            _timed(self._encode_image(params, request_id)),
        )

        # 2. Denoise: the request joins the Denoiser's running batch for all its steps.
        t = time.perf_counter()
        denoise = _denoise_request(params, encoded, request_id, preview_every if stream else 0)
        denoise.progress_interval_s = progress_interval_s
        denoise.guidance_stop = params.guidance_stop
        denoise.cache_interval = params.cache_interval
        if init is not None:
            denoise.init.CopyFrom(init)
            denoise.strength = params.strength
        denoise.timeout_s = _check(deadline, request_id, "before the denoiser")
        if stream:
            latents = None
            async for event in self._denoise_events(denoise, started):
                if isinstance(event, stages_pb2.Tensor):
                    latents = event
                else:
                    yield event
            if latents is None:
                raise Internal("the Denoiser's stream ended without latents")
        else:
            latents = (await self.client.denoise(denoise)).latents
        denoise_s = time.perf_counter() - t

        # 3. Decode the latents to PNGs, each carrying its generation parameters.
        _check(deadline, request_id, "before the VAE decoder")
        t = time.perf_counter()
        decoded = await self.client.decode(
            stages_pb2.DecodeRequest(
                request_id=request_id,
                latents=latents,
                parameters=[params.png_parameters(s, self._model_name) for s in params.seeds],
            )
        )
        vae_s = time.perf_counter() - t

        timings = Timings(text_s, denoise_s, vae_s, total_s=time.perf_counter() - started,
                          vae_encoder_s=image_s)  # fmt: skip
        seconds = {"text_encoder": text_s, "denoiser": denoise_s, "vae_decoder": vae_s}
        if init is not None:
            seconds["vae_encoder"] = image_s
        self.stats.record(RequestServed(images=len(decoded.png), stage_seconds=seconds))
        logger.info(
            "request %s done in %.3fs (text %.3fs, denoise %.3fs, vae %.3fs)",
            request_id, timings.total_s, text_s, denoise_s, vae_s,
        )  # fmt: skip
        yield Result(request_id, params, tuple(decoded.png), timings)

    async def _encode_text(
        self, params: GenerateParams, request_id: str
    ) -> stages_pb2.EncodeTextResponse:
        """The prompt's embeddings (and the negative prompt's when guidance is on)."""
        request = stages_pb2.EncodeTextRequest(
            request_id=request_id,
            prompt=params.prompt,
            negative_prompt=params.negative_prompt,
            with_uncond=params.guided,
        )
        return await self.client.encode_text(request)

    async def _encode_image(
        self, params: GenerateParams, request_id: str
    ) -> stages_pb2.EncodeImageResponse | None:
        """The VaeEncoder's encoding of the init image and mask; None for text-to-image."""
        if not params.init_image:
            return None
        request = stages_pb2.EncodeImageRequest(
            request_id=request_id, init_image=params.init_image, mask_image=params.mask_image
        )
        return await self.client.encode_image(request)

    async def _denoise_events(
        self, denoise: stages_pb2.DenoiseRequest, started: float
    ) -> AsyncIterator[Queued | Progress | Preview | stages_pb2.Tensor]:
        """The Denoiser's stream as domain events; the final latents come last."""
        async for event in self.client.denoise_stream(denoise):
            kind = event.WhichOneof("event")
            if kind == "queued":
                yield Queued(position=event.queued.position, request_id=denoise.request_id)
            elif kind == "step":
                step = event.step
                yield Progress(step.step, step.total, elapsed_s=time.perf_counter() - started)
                if step.preview_png:
                    yield Preview(step=step.step, pngs=tuple(step.preview_png))
            elif kind == "done":
                yield event.done.latents


async def _timed(awaitable):
    """(its result, seconds it took)."""
    started = time.perf_counter()
    result = await awaitable
    return result, time.perf_counter() - started


def _check(deadline: float | None, request_id: str, where: str) -> float:
    """Seconds left before `deadline` (0: none); raises DeadlineExceeded once it passed."""
    if deadline is None:
        return 0.0
    left = deadline - time.time()
    if left <= 0:
        raise DeadlineExceeded(f"request {request_id}: its deadline passed {where}")
    return left


def _denoise_request(
    params: GenerateParams,
    encoded: stages_pb2.EncodeTextResponse,
    request_id: str,
    preview_every: int,
) -> stages_pb2.DenoiseRequest:
    denoise = stages_pb2.DenoiseRequest(
        request_id=request_id,
        cond=encoded.cond,
        width=params.width,
        height=params.height,
        steps=params.steps,
        guidance_scale=params.guidance_scale,
        scheduler=params.scheduler,
        seeds=params.seeds,
        preview_every=preview_every,
    )
    for name, field in (("uncond", "uncond"), ("cond_pooled", "cond_pooled"),
                        ("uncond_pooled", "uncond_pooled")):  # fmt: skip
        if encoded.HasField(name):
            getattr(denoise, field).CopyFrom(getattr(encoded, name))
    return denoise
