"""The JobWorker deployment: runs queued jobs from Redis through the same stage path as
Generate, so jobs and synchronous requests batch together in the Denoiser.

Each replica is one consumer of the queue's consumer group, running `jobs.concurrency` jobs at
once (sdserve.jobs.worker has the delivery logic). It needs no CPU of its own: it only awaits
the stages.
"""

from __future__ import annotations

import asyncio
import json
import logging

from ray import serve
from ray.serve.handle import DeploymentHandle

from sdserve.config import SdserveConfig
from sdserve.deployments._common import show_pipeline_logs, watch_drain
from sdserve.deployments.stage_path import StagePath
from sdserve.errors import Internal
from sdserve.jobs.queue import JobQueue
from sdserve.jobs.worker import Report, Worker
from sdserve.metrics import Metrics
from sdserve.v1 import diffusion_pb2

logger = logging.getLogger("ray.serve")


@serve.deployment(name="JobWorker")
class JobWorkerDeployment:
    async def __init__(
        self,
        text_encoder: DeploymentHandle,
        denoiser: DeploymentHandle,
        vae_decoder: DeploymentHandle,
        config: dict,
    ):
        show_pipeline_logs()  # sdserve.jobs' log lines: one per job started and ended
        self.config = SdserveConfig.model_validate(config)
        self.metrics = Metrics(self.config.metrics.enabled)
        self._path = StagePath(text_encoder, denoiser, vae_decoder, self.config, self.metrics)
        self._queue = JobQueue.from_config(self.config.jobs)
        self._worker = Worker(
            self._queue,
            self._run,
            concurrency=self.config.jobs.concurrency,
            on_count=self._on_count,
        )
        # The replica's event loop runs the worker beside Serve's own calls (Stats, health).
        loop = asyncio.get_running_loop()
        self._task = loop.create_task(self._worker.run_forever())
        self._drain_watch = loop.create_task(watch_drain(self.config.server.app_name, self._drain))

    def _on_count(self, event: str) -> None:
        if event == "started":
            self.metrics.job_attempts.inc()
        elif event in ("succeeded", "failed", "cancelled"):
            self.metrics.jobs_finished.inc(tags={"state": event.upper()})
        if event == "dead_lettered":
            self.metrics.jobs_dead_lettered.inc()

    async def _run(self, request: bytes, job_id: str, report: Report) -> bytes:
        """One job: GenerateRequest bytes in, GenerateResponse bytes out, a report per step."""
        generate = diffusion_pb2.GenerateRequest.FromString(request)
        request_id = f"job-{job_id}"
        # Serve passes the request id of the current context on to the stages it calls, and
        # every replica's log lines carry it: one job can be followed across replicas. (This
        # task is the worker's own, so the context set here is the job's alone.)
        serve.context._set_request_context(request_id=request_id)
        async for event in self._path.run(generate, stream=True, request_id=request_id):
            if event.HasField("progress"):
                await report(event.progress.step, event.progress.total)
            elif event.HasField("result"):
                return event.result.SerializeToString()
        raise Internal("the pipeline ended without a result")

    def _drain(self) -> None:
        """`sdserve serve` is shutting down (server.drain): take no new jobs; running ones
        finish, queued ones stay in Redis."""
        logger.info("draining: no new jobs; %d running", self._worker.running)
        self._worker.stop()

    async def Stats(self, _: bytes = b"") -> bytes:
        """This replica's consumer name and job counters, as JSON."""
        return json.dumps(
            {"consumer": self._worker.consumer, "counts": dict(self._worker.counts)}
        ).encode()

    async def check_health(self) -> None:
        """Serve restarts the replica if its worker loop ever stops."""
        if self._task.done():
            raise RuntimeError(f"the job worker loop stopped: {self._task!r}")

    async def __del__(self) -> None:
        """Serve is removing this replica (a scale-down, or shutdown): drain. Take no new jobs,
        let the running ones finish within most of the stage's graceful_shutdown_timeout_s,
        then abandon the rest: their leases run out and another worker takes them over. Jobs
        still queued stay in Redis."""
        self._worker.stop()
        drain_s = 0.8 * self.config.stages.job_worker.graceful_shutdown_timeout_s
        running = self._worker.running
        if running:
            logger.info("draining: waiting up to %.0fs for %d running job(s)", drain_s, running)
        try:
            await asyncio.wait_for(asyncio.shield(self._task), timeout=drain_s)
        except TimeoutError:
            logger.warning("drain time over: %d job(s) left to other workers",
                           self._worker.running)  # fmt: skip
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        await self._queue.close()
