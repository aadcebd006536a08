"""The Denoiser deployment: DenoiseRequest -> DenoiseResponse / a stream of DenoiseEvent.

The whole denoising loop runs here, in the replica's `DenoiseEngine` (its own thread), which
batches the U-Net steps of every request this replica holds. Each call bridges engine events
to the replica's event loop; when Serve cancels the call (the client cancelled, or its deadline
passed) the request is cancelled in the engine and leaves the batch at the next step.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator

from ray import serve

from sdserve.config import SdserveConfig
from sdserve.deployments._common import TorchThread, load_stage
from sdserve.errors import DeadlineExceeded, Internal
from sdserve.metrics import Metrics
from sdserve.pipeline import engine as eng
from sdserve.pipeline.denoise import Denoiser
from sdserve.pipeline.vae import preview_pixels, to_png
from sdserve.types import tensor_from_pb, tensor_to_pb
from sdserve.v1 import stages_pb2


@serve.deployment(name="Denoiser")
class DenoiserDeployment:
    def __init__(self, config: dict):
        tree = SdserveConfig.model_validate(config)
        engine_config = tree.engine
        self.metrics = Metrics(tree.metrics.enabled)
        self.torch = TorchThread("denoiser")
        self.denoiser = self.torch.call(load_stage, Denoiser, config, "denoiser", self.metrics)
        self.counters = stages_pb2.DenoiserStats(strategy=engine_config.batching)
        self.engine = eng.DenoiseEngine(
            self.denoiser.unet,
            max_batch_size=engine_config.max_batch_size,
            strategy=engine_config.batching,
            on_stats=self._on_stats,
        )
        self.engine.start(self.torch.executor)  # the engine loop owns the torch thread

    def __del__(self):  # Serve is removing the replica
        self.engine.stop(timeout_s=1)

    # -- engine thread callbacks ----------------------------------------------------------------
    def _on_stats(self, stats: eng.StepStats) -> None:
        self.counters.unet_steps += 1
        self.counters.unet_seconds += stats.duration_s
        self.counters.max_batch_size_seen = max(self.counters.max_batch_size_seen, stats.batch_size)
        m = self.metrics
        m.denoiser_batch_size.observe(stats.batch_size)
        m.unet_step_seconds.observe(stats.duration_s)
        m.denoising_steps.inc(stats.batch_size)
        m.denoiser_waiting_requests.set(stats.waiting)
        m.denoiser_running_requests.set(stats.running)

    def _count(self, event: eng.Event) -> None:
        if isinstance(event, eng.Started):
            self.metrics.queue_wait_seconds.observe(event.wait_s)
        elif isinstance(event, eng.Finished | eng.Cancelled | eng.Failed):
            waiting, running = self.engine.counts()  # so that an idle engine reads 0
            self.metrics.denoiser_waiting_requests.set(waiting)
            self.metrics.denoiser_running_requests.set(running)
        if isinstance(event, eng.Finished):
            self.counters.finished += 1
        elif isinstance(event, eng.Cancelled):
            self.counters.cancelled += 1

    # -- bridging ------------------------------------------------------------------------------
    async def _events(
        self, req: stages_pb2.DenoiseRequest, progress: bool = True
    ) -> AsyncIterator[eng.Event]:
        """Submits the request to the engine and yields its events until it ends; without
        `progress`, only the final one (no per-step wake-ups of this event loop)."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[eng.Event] = asyncio.Queue()

        def on_event(event: eng.Event) -> None:  # engine thread
            self._count(event)
            if progress or not isinstance(event, eng.Queued | eng.Started | eng.Step):
                loop.call_soon_threadsafe(queue.put_nowait, event)

        job = self.denoiser.make_job(
            f"{req.request_id or 'anonymous'}/{uuid.uuid4().hex[:8]}",
            tensor_from_pb(req.cond),
            tensor_from_pb(req.uncond) if req.HasField("uncond") else None,
            width=req.width,
            height=req.height,
            steps=req.steps,
            guidance_scale=req.guidance_scale,
            scheduler=req.scheduler,
            seeds=list(req.seeds),
            on_event=on_event,
            deadline=time.monotonic() + req.timeout_s if req.timeout_s > 0 else None,
            preview_every=req.preview_every,
        )
        self.engine.submit(job)
        ended = False
        try:
            while True:
                event = await queue.get()
                if isinstance(event, eng.Cancelled):
                    ended = True
                    raise DeadlineExceeded(f"request {req.request_id}: {event.reason}")
                if isinstance(event, eng.Failed):
                    ended = True
                    raise Internal(f"request {req.request_id}: denoising failed") from event.error
                ended = isinstance(event, eng.Finished)
                yield event
                if ended:
                    return
        finally:
            if not ended:  # the caller went away (Serve cancelled the call): free the slot
                self.engine.cancel(job.request_id)

    # -- RPC methods ---------------------------------------------------------------------------
    async def Denoise(self, request: bytes) -> bytes:
        """Serialized `DenoiseRequest` -> serialized `DenoiseResponse`."""
        req = stages_pb2.DenoiseRequest.FromString(request)
        async for event in self._events(req, progress=False):
            if isinstance(event, eng.Finished):
                return stages_pb2.DenoiseResponse(
                    latents=tensor_to_pb(event.latents)
                ).SerializeToString()
        raise Internal("the engine ended a request without a result")

    async def DenoiseStream(self, request: bytes) -> AsyncIterator[bytes]:
        """Serialized `DenoiseRequest` -> serialized `DenoiseEvent`s: queued, steps, done."""
        req = stages_pb2.DenoiseRequest.FromString(request)
        async for event in self._events(req):
            if isinstance(event, eng.Queued):
                out = stages_pb2.DenoiseEvent(
                    queued=stages_pb2.DenoiseQueued(position=event.position)
                )
            elif isinstance(event, eng.Step):
                step = stages_pb2.DenoiseStep(
                    step=event.step, total=event.total, elapsed_s=event.elapsed_s
                )
                if event.latents is not None:
                    pixels = preview_pixels(event.latents, req.width, req.height)
                    step.preview_png.extend(to_png(p) for p in pixels)
                out = stages_pb2.DenoiseEvent(step=step)
            elif isinstance(event, eng.Finished):
                out = stages_pb2.DenoiseEvent(
                    done=stages_pb2.DenoiseResponse(latents=tensor_to_pb(event.latents))
                )
            else:
                continue
            yield out.SerializeToString()

    def Info(self, request: bytes = b"") -> bytes:
        """Serialized `DenoiserInfo`: the model's native size and latent scale."""
        width, height = self.denoiser.native_size
        return stages_pb2.DenoiserInfo(
            native_width=width,
            native_height=height,
            vae_scale_factor=self.denoiser.vae_scale_factor,
        ).SerializeToString()

    def Stats(self, request: bytes = b"") -> bytes:
        """Serialized `DenoiserStats` of this replica."""
        stats = stages_pb2.DenoiserStats()
        stats.CopyFrom(self.counters)
        stats.waiting, stats.running = self.engine.counts()
        return stats.SerializeToString()
