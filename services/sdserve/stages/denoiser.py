"""The Denoiser stage: Denoise -> Denoised, or a stream of DenoiseEvents.

The whole denoising loop runs here, in the service's `DenoiseEngine`, which batches the U-Net
steps of every request the service holds (step-level batching). The engine's steps are tasks
on the service's torch thread, and so is every other piece of torch work: preparing a request
(its schedulers, generators and initial noise), previews, and the final latents' copy to the
CPU. Engine events become stage messages (`sdserve.stages.messages`) on that thread and are
handed to the caller's event loop, which only awaits; previews are PNG-encoded on a worker
thread (an encoding is milliseconds the loop's other requests would wait).

When the caller stops waiting (the client cancelled, or its deadline passed), the request is
cancelled in the engine: it leaves the batch at the next step and is never decoded. Every
request ends: the wait for the engine is bounded by the request's deadline (or
`engine.max_request_s`), and closing the service fails what its engine holds (UNAVAILABLE).
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, replace

import numpy as np

from sdserve.config import EngineConfig, ModelConfig, SdserveConfig
from sdserve.errors import (
    DeadlineExceeded,
    Internal,
    InvalidArgument,
    ResourceExhausted,
    Unavailable,
)
from sdserve.metrics import StatsLogger
from sdserve.pipeline import engine as eng
from sdserve.pipeline.denoise import DenoiseJob, Denoiser
from sdserve.pipeline.dit_denoise import TransformerDenoiser, denoiser_part
from sdserve.pipeline.images import EncodedImage
from sdserve.pipeline.lora import load_lora
from sdserve.pipeline.threads import ThreadPlan
from sdserve.pipeline.vae import preview_pixels, to_png
from sdserve.stages.compiling import compile_unet
from sdserve.stages.controlnets import ControlNets
from sdserve.stages.loras import Adapters
from sdserve.stages.messages import (
    Denoise,
    Denoised,
    DenoiseEvent,
    DenoiseQueued,
    DenoiserInfo,
    DenoiserStats,
    DenoiseStep,
    ImageEncoding,
)
from sdserve.stages.runtime import TorchThread, load_stage, stage_info, thread_plan
from sdserve.stages.tensors import returned, unpack, unpack_optional
from sdserve.stats import RequestAdmitted, RequestEnded, RequestPaused

logger = logging.getLogger(__name__)

ENGINE_GRACE_S = 0.25
"""How much longer than a request's deadline its wait for the engine lasts: the engine drops a
request at its deadline itself (at a step boundary, counted as expired); this bound is for an
engine that does not answer at all."""


@dataclass(frozen=True)
class _WithPreview:
    """A step event whose preview pixels still need PNG encoding (done off the torch thread)."""

    event: DenoiseStep
    pixels: np.ndarray
    """uint8, shape (num_images, height, width, 3)."""


class DenoiserService:
    """Runs denoising requests through one engine on one torch thread."""

    def __init__(
        self,
        denoiser: Denoiser | TransformerDenoiser,
        engine: EngineConfig,
        stats: StatsLogger,
        torch_thread: TorchThread,
        threads: ThreadPlan | None = None,
    ):
        self.denoiser = denoiser
        self.stats = stats
        self.torch = torch_thread
        self.strategy = engine.batching
        self.max_request_s = engine.max_request_s
        """How long a request without a deadline may wait for the engine's answer."""
        self.cache_levels = engine.deepcache_levels
        self.transformer = isinstance(denoiser, TransformerDenoiser)
        """A diffusion transformer (SD3, FLUX): no adapters, ControlNets or DeepCache."""
        unet = denoiser.transformer if self.transformer else denoiser.unet
        if not self.transformer and self.cache_levels >= len(unet.down_blocks):
            raise ValueError(f"engine.deepcache_levels must be below the U-Net's "
                             f"{len(unet.down_blocks)} levels")  # fmt: skip
        self.adapters: Adapters | None = None
        """The model's LoRA adapters (their U-Net weights), loaded on first use."""
        self.controlnets = ControlNets.none(unet)
        """The model's ControlNets, loaded on first use (`from_config` finds them)."""
        self.threads = threads
        self.engine = eng.DenoiseEngine(
            unet,
            step=denoiser.step,
            max_batch_size=engine.max_batch_size,
            strategy=engine.batching,
            lora_policy=engine.lora_policy,
            on_stats=stats.record,
            threads_for_rows=threads.threads_for if threads is not None else None,
            forward=denoiser.forward,
            batch_invariant=engine.batch_invariant,
            policy=engine.scheduling,
            bulk_images_with_interactive=engine.bulk_images_with_interactive,
        )
        self.engine.start(torch_thread.executor)
        stats.full_batch = engine.max_batch_size

    @classmethod
    def from_config(
        cls,
        config: SdserveConfig,
        stats: StatsLogger,
        torch_thread: TorchThread | None = None,
        model: ModelConfig | None = None,
    ) -> DenoiserService:
        """Loads `unet/` and `scheduler/` of `model` (default: the config's default model) on
        the torch thread (a new one unless given) and starts the engine there."""
        model = model or config.model_named()
        thread = torch_thread or TorchThread("denoiser")
        denoiser = thread.call(load_stage, denoiser_part, model, "denoiser", stats)
        rows = (2, 2 * config.engine.max_batch_size)  # one guided image; a full batch
        plan = thread.call(thread_plan, config, "denoiser", denoiser, model, *rows)
        if isinstance(denoiser, TransformerDenoiser):
            logger.info("the %s transformer of model %s runs eagerly", denoiser.family, model.name)
            return cls(denoiser, config.engine, stats, thread, plan)
        plan = thread.call(compile_unet, denoiser, config.engine, stats, plan, model.name)
        service = cls(denoiser, config.engine, stats, thread, plan)
        service.adapters = Adapters.for_model(
            config, model, lambda path, name: load_lora(path, name, unet=denoiser.unet)
        )
        service.controlnets = ControlNets.for_model(config, model, denoiser)
        return service

    def close(self) -> None:
        """Stops the engine: requests still in it end with UNAVAILABLE."""
        self.engine.stop(timeout_s=1)

    # -- the stage's calls ---------------------------------------------------------------------
    async def denoise(self, req: Denoise) -> Denoised:
        """The final latents of every image of the request."""
        async for event in self._events(req, progress=False):
            if isinstance(event, Denoised):
                return event
        raise Internal("the engine ended a request without a result")

    async def denoise_stream(self, req: Denoise) -> AsyncIterator[DenoiseEvent]:
        """queued, one `step` per denoising step (with previews every `preview_every`), done."""
        async for event in self._events(req, progress=True):
            yield event

    def info(self) -> DenoiserInfo:
        """The model's native size and latent scale."""
        width, height = self.denoiser.native_size
        mode = self.denoiser.forward.mode if self.denoiser.forward is not None else "off"
        return DenoiserInfo(
            native_width=width,
            native_height=height,
            vae_scale_factor=self.denoiser.vae_scale_factor,
            unet_in_channels=(
                self.denoiser.in_channels
                if self.transformer
                else self.denoiser.unet.config.in_channels
            ),  # fmt: skip
            family=self.denoiser.family,
            prediction_type=self.denoiser.prediction_type,
            loras=self.adapters.listing() if self.adapters else (),
            stage=stage_info("denoiser", self.denoiser, self.threads, mode),
            controlnets=self.controlnets.listing(),
        )

    def stats_message(self) -> DenoiserStats:
        """The engine's counters since the service started (`StatsLogger.denoiser`), and its
        load now."""
        c = self.stats.denoiser_counters()
        waiting, running = self.engine.counts()
        return DenoiserStats(
            waiting=waiting,
            running=running,
            unet_steps=c.unet_steps,
            finished=c.finished,
            cancelled=c.cancelled,
            expired=c.expired,
            failed=c.failed,
            strategy=self.strategy,
            unet_seconds=c.unet_seconds,
            image_steps=c.image_steps,
            shared_steps=c.shared_steps,
            unet_busy_ratio=self.stats.unet_busy_ratio(),
            work_ahead=self.engine.work_ahead(),
            capacity=self.stats.capacity(),
            unet_rows=c.unet_rows,
            shallow_rows=c.shallow_rows,
            compiles=c.compiles,
            recompiles=c.recompiles,
            interactive_work_ahead=self.engine.work_ahead(
                "interactive" if self.engine.prioritized else None  # fifo: it waits for all
            ),
            paused=self.engine.paused(),
            preemptions=c.preemptions,
        )

    # -- bridging the engine (torch thread) and the caller (event loop) -------------------------
    async def _events(self, req: Denoise, progress: bool) -> AsyncIterator[DenoiseEvent]:
        """Submits the request and yields its events until it ends; without `progress`, only
        the final one (no per-step wake-ups of the event loop). Raises DeadlineExceeded when
        the engine has not answered by the request's deadline (`timeout_s`, or without one
        `engine.max_request_s`)."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        job_id = f"{req.request_id or 'anonymous'}/{uuid.uuid4().hex[:8]}"
        limit_s = req.timeout_s + ENGINE_GRACE_S if req.timeout_s > 0 else self.max_request_s
        ends_at = loop.time() + limit_s
        last_step_sent, queue_s = float("-inf"), 0.0

        def on_event(event: eng.Event) -> None:  # torch thread
            nonlocal last_step_sent, queue_s
            queue_s = event.wait_s if isinstance(event, eng.Started) else queue_s
            self._record(event, req.request_class, queue_s)
            if isinstance(event, eng.Step) and event.step < event.total and event.latents is None:
                if event.elapsed_s - last_step_sent < req.progress_interval_s:
                    return  # coalesced: the next step event reports it
                last_step_sent = event.elapsed_s
            item = self._message(event, req, progress, queue_s)
            if item is not None:
                loop.call_soon_threadsafe(queue.put_nowait, item)

        prepared = self.torch.submit(self._prepare, req, job_id, on_event)
        ended = False
        try:
            await _before(ends_at, asyncio.wrap_future(prepared), req.request_id)
            while not ended:
                item = await _before(ends_at, queue.get(), req.request_id)
                if isinstance(item, BaseException):
                    ended = True
                    raise item
                if isinstance(item, _WithPreview):
                    pngs = await asyncio.to_thread(_pngs, item.pixels)
                    item = replace(item.event, preview_pngs=pngs)
                ended = isinstance(item, Denoised)
                yield item
        finally:
            if not ended:  # the caller went away: free the slot (once the job is submitted)
                prepared.add_done_callback(lambda _: self.engine.cancel(job_id))

    def _prepare(self, req: Denoise, job_id: str, on_event: Callable[[eng.Event], None]) -> None:
        """Torch thread: builds the request's samples as diffusers does and submits them."""
        job = (self._transformer_job if self.transformer else self._unet_job)(req, job_id, on_event)
        job.request_class, job.priority, job.tenant = req.request_class, req.priority, req.tenant
        self.engine.submit(job)

    def _unet_job(self, req: Denoise, job_id: str,
                  on_event: Callable[[eng.Event], None]) -> DenoiseJob:  # fmt: skip
        """A U-Net's job: its embeddings, image input, adapters and ControlNets."""
        loras = self.adapters.resolve(req.loras) if req.loras and self.adapters else ()
        controls = self.controlnets.resolve(req.controls, req.width, req.height)
        embeddings, init = req.embeddings, _encoded_image(req.init)
        job: DenoiseJob = self.denoiser.make_job(
            job_id,
            unpack(embeddings.cond),
            unpack_optional(embeddings.uncond),
            width=req.width,
            height=req.height,
            steps=req.steps,
            guidance_scale=req.guidance_scale,
            scheduler=req.scheduler,
            seeds=list(req.seeds),
            on_event=on_event,
            deadline=time.monotonic() + req.timeout_s if req.timeout_s > 0 else None,
            preview_every=req.preview_every,
            init=init,
            strength=req.strength if init is not None else 1.0,
            guidance_stop=req.guidance_stop,
            cache_interval=req.cache_interval,
            cache_levels=self.cache_levels,
            pooled=unpack_optional(embeddings.cond_pooled),
            uncond_pooled=unpack_optional(embeddings.uncond_pooled),
            loras=loras,
            controls=controls,
        )
        return job

    def _transformer_job(self, req: Denoise, job_id: str,
                         on_event: Callable[[eng.Event], None]) -> DenoiseJob:  # fmt: skip
        """A diffusion transformer's job: the CLIP and the T5 embeddings, as the family's
        pipeline puts them together (`TransformerDenoiser.make_job`)."""
        e, t5 = req.embeddings, req.t5
        taken = {"init": req.init is None, "loras": not req.loras, "controls": not req.controls,
                 "cache_interval": req.cache_interval <= 1}  # fmt: skip
        for name in (name for name, ok in taken.items() if not ok):  # the request path refuses
            raise InvalidArgument(name, f"a {self.denoiser.family} model does not take it")
        if t5 is None:
            raise Internal(f"request {req.request_id}: a {self.denoiser.family} request "
                           "reached the Denoiser without its T5 embeddings")  # fmt: skip
        return self.denoiser.make_job(
            job_id, unpack_optional(e.cond), unpack_optional(e.uncond), width=req.width,
            height=req.height, steps=req.steps, guidance_scale=req.guidance_scale,
            seeds=list(req.seeds), pooled=unpack(e.cond_pooled),
            uncond_pooled=unpack_optional(e.uncond_pooled), t5_cond=unpack(t5.cond),
            t5_uncond=unpack_optional(t5.uncond), true_cfg_scale=req.true_cfg_scale,
            shift=req.shift, guidance_stop=req.guidance_stop, on_event=on_event,
            deadline=time.monotonic() + req.timeout_s if req.timeout_s > 0 else None,
            preview_every=req.preview_every,
        )  # fmt: skip

    def _record(self, event: eng.Event, request_class: str, queue_s: float) -> None:
        """Torch thread: the stats of a request's event. Never raises: a failure to record
        costs the request nothing."""
        try:
            self._record_stats(event, request_class, queue_s)
        except Exception:
            logger.exception("recording the stats of a Denoiser event failed")

    def _record_stats(self, event: eng.Event, request_class: str, queue_s: float) -> None:
        if isinstance(event, eng.Started):
            self.stats.record(RequestAdmitted(wait_s=event.wait_s, request_class=request_class))
        if isinstance(event, eng.Paused):
            self.stats.record(RequestPaused(request_class))
        outcome = {eng.Finished: "finished", eng.Cancelled: "cancelled", eng.Failed: "failed"}
        if type(event) in outcome:
            ended = outcome[type(event)]
            if isinstance(event, eng.Cancelled) and event.reason == eng.DEADLINE_EXCEEDED:
                ended = "expired"
            paused_s = event.paused_s if isinstance(event, eng.Finished) else 0.0
            counts = self.engine.counts()
            self.stats.record(RequestEnded(ended, *counts, request_class, paused_s))

    @staticmethod
    def _message(event: eng.Event, req: Denoise, progress: bool, queue_s: float = 0.0):
        """Torch thread: the stage message (or error) an engine event becomes, or None."""
        if isinstance(event, eng.Finished):  # a fresh tensor (a cat of the samples' latents)
            return Denoised(returned(event.latents), queue_s, event.paused_s)
        if isinstance(event, eng.Cancelled):
            return DeadlineExceeded(f"request {req.request_id}: {event.reason}")
        if isinstance(event, eng.Failed):
            if isinstance(event.error, Unavailable):  # the engine stopped: retry elsewhere
                return Unavailable(f"request {req.request_id}: {event.error}")
            if eng.is_out_of_memory(event.error):
                error = ResourceExhausted(
                    f"request {req.request_id}: out of memory in its denoiser "
                    "forward; retry later, or with fewer or smaller images"
                )
            else:
                error = Internal(f"request {req.request_id}: denoising failed")
            error.__cause__ = event.error
            return error
        if not progress:
            return None
        if isinstance(event, eng.Queued):
            return DenoiseQueued(position=event.position)
        if isinstance(event, eng.Step):
            message = DenoiseStep(step=event.step, total=event.total, elapsed_s=event.elapsed_s)
            if event.latents is None:
                return message
            return _WithPreview(message, preview_pixels(event.latents, req.width, req.height))
        return None


async def _before(ends_at: float, awaitable, request_id: str):
    """`await awaitable`, or DeadlineExceeded once the loop's clock reaches `ends_at`."""
    timeout = asyncio.timeout_at(ends_at)
    try:
        async with timeout:
            return await awaitable
    except TimeoutError:
        if not timeout.expired():
            raise
        raise DeadlineExceeded(f"request {request_id}: the Denoiser's engine did not answer "
                               "before the request's deadline") from None  # fmt: skip


def _pngs(pixels: np.ndarray) -> tuple[bytes, ...]:
    """The PNGs of preview pixels, (num_images, height, width, 3) uint8 (a worker thread)."""
    return tuple(map(to_png, pixels))


def _encoded_image(init: ImageEncoding | None) -> EncodedImage | None:
    """The pipeline's form of the VaeEncoder's encoding, its tensors unpacked."""
    if init is None:
        return None
    return EncodedImage(unpack(init.image), init.scaling_factor, unpack_optional(init.masked),
                        unpack_optional(init.mask))  # fmt: skip
