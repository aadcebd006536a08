"""The JobWorker deployment: runs queued jobs from Redis through the same stage path as
Generate, so jobs and synchronous requests batch together in the Denoiser.

Each replica is one consumer of the queue's consumer group, running `jobs.concurrency` jobs at
once (sdserve.jobs.worker has the delivery logic). It needs no CPU of its own: it only awaits
the stages.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging

from ray import serve

from sdserve.config import ModelConfig
from sdserve.jobs.queue import JobQueue
from sdserve.jobs.runner import JobRunner
from sdserve.jobs.webhook_sender import WebhookSender
from sdserve.jobs.worker import Worker
from sdserve.orchestration.path import StagePath
from sdserve.serve import _ray
from sdserve.serve.client import ServeStageClient, StageHandles, stage_clients
from sdserve.serve.common import replica_setup, watch_drain
from sdserve.serve.runtime_models import RuntimeModels

logger = logging.getLogger("ray.serve")


@serve.deployment(name="JobWorker")
class JobWorkerDeployment:
    async def __init__(self, models: dict[str, StageHandles], config: dict):
        """`models`: each served model's stage deployments, the default model first."""
        self.config, self.stats = replica_setup(config)
        clients = stage_clients(models, self.config.server.stage_transport)
        # Serve passes the request id of the current context on to the stages it calls, and
        # every replica's log lines carry it: one job can be followed across replicas. (Each
        # job runs in a task of the worker's own, so the id set there is the job's alone.)
        jobs = self.config.jobs
        self._queue = JobQueue.from_config(self.config.jobs)
        record = functools.partial(self._queue.get, with_result=False)
        self._path = StagePath(clients, self.config, self.stats)
        runner = JobRunner(self._path, _ray.set_request_id, jobs.progress_interval_s,
                           jobs.timeout_s, record)  # fmt: skip
        self._worker = Worker(self._queue, runner, concurrency=jobs.concurrency,
                              stats=self.stats, timeout_s=jobs.timeout_s)  # fmt: skip
        # The replica's event loop runs the worker beside Serve's own calls (Stats, health).
        loop = asyncio.get_running_loop()
        self._task = loop.create_task(self._worker.run_forever())
        # Ended jobs with a callback URL: their events, signed, retried (jobs/webhook_sender.py).
        self._webhooks = WebhookSender(self._queue, self.config)
        self._webhook_task = loop.create_task(self._webhooks.run())
        self._drain_watch = loop.create_task(watch_drain(self.config.server.app_name, self._drain))
        # Models added at runtime (AdminService): jobs may name them too.
        self._runtime = RuntimeModels(self.config, self._add_model, self._path.remove_model,
                                      self._path.inflight.__getitem__)  # fmt: skip
        self._runtime_task = loop.create_task(self._runtime.run())

    def _add_model(self, model: ModelConfig, handles: StageHandles) -> None:
        client = ServeStageClient(handles, self.config.server.stage_transport)
        self._path.add_model(model, client)

    def _drain(self) -> None:
        """`sdserve serve` is shutting down (server.drain): take no new jobs; running ones
        finish, queued ones stay in Redis."""
        logger.info("draining: no new jobs; %d running", self._worker.running)
        self._worker.stop()

    async def Stats(self, _: bytes = b"") -> bytes:
        """This replica's consumer name and job counters, as JSON."""
        return json.dumps(
            {"consumer": self._worker.consumer, "counts": dict(self.stats.jobs)}
        ).encode()

    async def check_health(self) -> None:
        """Serve restarts the replica if its worker loop ever stops."""
        for task in (self._task, self._webhook_task):
            if task.done():
                raise RuntimeError(f"a job worker loop stopped: {task!r}")

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
        except TimeoutError:  # asyncio.wait_for raises the builtin one from Python 3.11
            logger.warning("drain time over: %d job(s) left to other workers",
                           self._worker.running)  # fmt: skip
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        self._webhook_task.cancel()  # what it had not sent, another replica sends (Redis)
        await asyncio.gather(self._webhook_task, return_exceptions=True)
        await self._webhooks.close()
        await self._queue.close()
