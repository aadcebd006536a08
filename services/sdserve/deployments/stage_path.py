"""The one pipeline path, text encoder -> denoiser -> VAE decoder, over deployment handles.

The Pipeline ingress runs it for Generate/GenerateStream and the JobWorker for queued jobs, so
jobs and synchronous requests share the Denoiser's running batch. It never touches a tensor:
embeddings and latents pass through as serialized stage messages.
"""

from __future__ import annotations

import contextlib
import logging
import time
import uuid
from collections.abc import AsyncIterator

from ray.serve.handle import DeploymentHandle

from sdserve.config import SdserveConfig
from sdserve.errors import Internal
from sdserve.metrics import Metrics
from sdserve.types import GenerateParams
from sdserve.v1 import diffusion_pb2, stages_pb2

# Serve's logger: its lines carry the replica and the request id, and land in Serve's logs.
logger = logging.getLogger("ray.serve")


@contextlib.contextmanager
def cancel_on_exit(response):
    """Cancels a stage call when the block is left early (the client cancelled, or its deadline
    passed). Serve's own propagation of a cancelled request to its child calls is best effort;
    measured here, it missed about half the streaming Denoiser calls."""
    finished = False
    try:
        yield
        finished = True
    finally:
        if not finished:
            response.cancel()


class StagePath:
    """Calls the three stage deployments for one request at a time (many concurrently)."""

    def __init__(
        self,
        text_encoder: DeploymentHandle,
        denoiser: DeploymentHandle,
        vae_decoder: DeploymentHandle,
        config: SdserveConfig,
        metrics: Metrics,
    ):
        self.config = config
        self.metrics = metrics
        # _by_reference=False: Serve's gRPC transport, straight to the replica (see DESIGN.md).
        by_reference = config.server.stage_transport == "actor"
        self._text = text_encoder.options(_by_reference=by_reference)
        self._denoiser = denoiser.options(_by_reference=by_reference)
        self._denoiser_stream = self._denoiser.options(stream=True)
        self._vae = vae_decoder.options(_by_reference=by_reference)
        self._info: stages_pb2.DenoiserInfo | None = None
        self._model_name = config.model.path or "sdserve-default"

    async def denoiser_info(self) -> stages_pb2.DenoiserInfo:
        """The model's native size and the like; asking it also checks the Denoiser answers."""
        if self._info is None:
            reply = await self._denoiser.Info.remote(b"")
            self._info = stages_pb2.DenoiserInfo.FromString(reply)
        return self._info

    async def validate(self, request: diffusion_pb2.GenerateRequest) -> GenerateParams:
        """The request's parameters, defaults filled in. Raises InvalidArgument."""
        info = await self.denoiser_info()
        return GenerateParams.from_pb(
            request,
            limits=self.config.limits,
            defaults=self.config.defaults,
            native_size=(info.native_width, info.native_height),
        )

    async def run(
        self, request: diffusion_pb2.GenerateRequest, *, stream: bool, request_id: str = ""
    ) -> AsyncIterator[diffusion_pb2.GenerateEvent]:
        """Validates and runs one request. Without `stream` it yields only the final `result`
        event. Closing the iterator early cancels the stage call in flight."""
        started = time.perf_counter()
        request_id = request_id or uuid.uuid4().hex
        params = await self.validate(request)
        logger.info(
            "request %s: %dx%d, %d steps of %s, guidance %g, %d image(s), seed %d",
            request_id, params.width, params.height, params.steps, params.scheduler,
            params.guidance_scale, params.num_images, params.seed,
        )  # fmt: skip

        # 1. Encode the prompt (and the negative prompt when guidance is on).
        t = time.perf_counter()
        encoded = stages_pb2.EncodeTextResponse.FromString(
            await self._text.Encode.remote(
                stages_pb2.EncodeTextRequest(
                    request_id=request_id,
                    prompt=params.prompt,
                    negative_prompt=params.negative_prompt,
                    with_uncond=params.guided,
                ).SerializeToString()
            )
        )
        text_s = time.perf_counter() - t

        # 2. Denoise: the request joins the Denoiser's running batch for all its steps.
        t = time.perf_counter()
        denoise = stages_pb2.DenoiseRequest(
            request_id=request_id,
            cond=encoded.cond,
            width=params.width,
            height=params.height,
            steps=params.steps,
            guidance_scale=params.guidance_scale,
            scheduler=params.scheduler,
            seeds=params.seeds,
            preview_every=request.preview_every if stream else 0,
        )
        if encoded.HasField("uncond"):
            denoise.uncond.CopyFrom(encoded.uncond)
        if not stream:
            call = self._denoiser.Denoise.remote(denoise.SerializeToString())
            with cancel_on_exit(call):
                latents = stages_pb2.DenoiseResponse.FromString(await call).latents
        else:
            latents = None
            events = self._denoiser_stream.DenoiseStream.remote(denoise.SerializeToString())
            with cancel_on_exit(events):
                async for raw in events:
                    event = stages_pb2.DenoiseEvent.FromString(raw)
                    kind = event.WhichOneof("event")
                    if kind == "queued":
                        yield diffusion_pb2.GenerateEvent(
                            queued=diffusion_pb2.Queued(
                                position=event.queued.position, request_id=request_id
                            )
                        )
                    elif kind == "step":
                        step = event.step
                        yield diffusion_pb2.GenerateEvent(
                            progress=diffusion_pb2.Progress(
                                step=step.step,
                                total=step.total,
                                elapsed_s=time.perf_counter() - started,
                            )
                        )
                        if step.preview_png:
                            yield diffusion_pb2.GenerateEvent(
                                preview=diffusion_pb2.Preview(step=step.step, png=step.preview_png)
                            )
                    elif kind == "done":
                        latents = event.done.latents
            if latents is None:
                raise Internal("the Denoiser's stream ended without latents")
        denoise_s = time.perf_counter() - t

        # 3. Decode the latents to PNGs, each carrying its generation parameters.
        t = time.perf_counter()
        decoded = stages_pb2.DecodeResponse.FromString(
            await self._vae.Decode.remote(
                stages_pb2.DecodeRequest(
                    request_id=request_id,
                    latents=latents,
                    parameters=[params.png_parameters(s, self._model_name) for s in params.seeds],
                ).SerializeToString()
            )
        )
        vae_s = time.perf_counter() - t

        total_s = time.perf_counter() - started
        for stage, seconds in (("text_encoder", text_s), ("denoiser", denoise_s),
                               ("vae_decoder", vae_s)):  # fmt: skip
            self.metrics.stage_latency_seconds.observe(seconds, tags={"stage": stage})
        self.metrics.images_generated.inc(len(decoded.png))
        logger.info(
            "request %s done in %.3fs (text %.3fs, denoise %.3fs, vae %.3fs)",
            request_id, total_s, text_s, denoise_s, vae_s,
        )  # fmt: skip
        yield diffusion_pb2.GenerateEvent(
            result=diffusion_pb2.GenerateResponse(
                images=[
                    diffusion_pb2.Image(
                        png=png, seed=seed, width=params.width, height=params.height
                    )
                    for png, seed in zip(decoded.png, params.seeds, strict=True)
                ],
                timings=diffusion_pb2.StageTimings(
                    text_encoder_s=text_s,
                    denoiser_s=denoise_s,
                    vae_decoder_s=vae_s,
                    total_s=total_s,
                ),
                request_id=request_id,
                parameters=params.resolved_pb(),
            )
        )
