"""Jobs through the real request path, without Ray: a Worker on the session's redis-server runs
each job with a JobRunner over the in-process stage client (the same StagePath, stage services
and engine as serving)."""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid

import pytest
from helpers import EAGER

from sdserve.api.proto import fields_from_pb
from sdserve.api.types import Result
from sdserve.config import ModelConfig, SdserveConfig
from sdserve.jobs.queue import JobQueue, JobState, wait_for
from sdserve.jobs.runner import JobRunner
from sdserve.jobs.worker import Worker
from sdserve.orchestration.path import StagePath
from sdserve.v1 import diffusion_pb2

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def path(in_process_path):
    return in_process_path


@contextlib.asynccontextmanager
async def _worker(redis_server, path):
    queue = JobQueue(redis_server.url, key_prefix=f"r{uuid.uuid4().hex[:8]}:", lease_s=2.0)
    bound = []
    worker = Worker(queue, JobRunner(path, bound.append), concurrency=2, block_ms=100)
    task = asyncio.create_task(worker.run_forever())
    try:
        yield queue, worker, bound
    finally:
        worker.stop()
        await asyncio.wait_for(task, timeout=10)
        await queue.close()


def test_a_job_makes_the_images_generate_makes(redis_server, path):
    request = diffusion_pb2.GenerateRequest(prompt="a job", steps=5, seed=77, num_images=2)

    async def main():
        async with _worker(redis_server, path) as (queue, worker, bound):
            job_id, _ = await queue.submit(request.SerializeToString(), total_steps=5)
            record = await wait_for(queue, job_id, 60)
            direct = [e async for e in path.run(await path.validate(fields_from_pb(request)))][-1]
            return record, worker, bound, job_id, direct

    record, worker, bound, job_id, direct = asyncio.run(main())
    assert record.state is JobState.SUCCEEDED and record.attempts == 1
    assert record.step == record.total_steps == 5
    assert isinstance(direct, Result)
    result = diffusion_pb2.GenerateResponse.FromString(record.result)
    assert [i.png for i in result.images] == list(direct.pngs)
    assert [i.seed for i in result.images] == [77, 78]
    assert bound == [f"job-{job_id}"]  # the Serve shell sets this id on the stage calls
    assert worker.counts["succeeded"] == 1


def test_cancelling_a_running_job_frees_its_batch_slot(redis_server, path):
    request = diffusion_pb2.GenerateRequest(prompt="long", steps=150, seed=1, guidance_scale=1)
    denoiser = path.client.denoiser

    async def main():
        async with _worker(redis_server, path) as (queue, worker, _):
            before = denoiser.stats_message()
            job_id, _ = await queue.submit(request.SerializeToString(), total_steps=150)
            deadline = time.monotonic() + 30
            while (await queue.get(job_id)).step < 3:
                assert time.monotonic() < deadline
                await asyncio.sleep(0.01)
            await queue.cancel(job_id)
            record = await wait_for(queue, job_id, 30)
            while denoiser.stats_message().running:
                await asyncio.sleep(0.01)
            return record, before, denoiser.stats_message(), worker

    record, before, after, worker = asyncio.run(main())
    assert record.state is JobState.CANCELLED and record.result is None
    assert after.cancelled - before.cancelled == 1
    assert after.finished == before.finished  # never decoded
    assert after.unet_steps - before.unet_steps < 150
    assert worker.counts["cancelled"] == 1


def test_an_invalid_stored_request_fails_the_job_at_once(redis_server, path):
    request = diffusion_pb2.GenerateRequest(prompt="x", steps=999)

    async def main():
        async with _worker(redis_server, path) as (queue, _, _):
            job_id, _ = await queue.submit(request.SerializeToString(), total_steps=999)
            return await wait_for(queue, job_id, 30)

    record = asyncio.run(main())
    assert record.state is JobState.FAILED and record.attempts == 1
    assert record.error.startswith("INVALID_ARGUMENT: steps: ")


def test_a_retried_job_keeps_the_parameters_it_was_submitted_with(redis_server, path, tiny_model):
    """SubmitJob stores the request with its defaults resolved: a worker whose configuration
    changed since (other default steps, sampler and guidance) makes the images of submission
    time."""
    from sdserve.config import DefaultsConfig
    from sdserve.jobs.runner import job_request

    request = diffusion_pb2.GenerateRequest(prompt="a job", seed=5)  # defaults for the rest
    other = SdserveConfig(
        model=ModelConfig(path=str(tiny_model), dtype="float32"),
        defaults=DefaultsConfig(steps=3, scheduler="euler", guidance_scale=2),
        **EAGER,
    )
    redeployed = StagePath(path.client, other)

    async def main():
        params = await path.validate(fields_from_pb(request))  # the configuration at submission
        direct = [e async for e in path.run(params)][-1]
        queue = JobQueue(redis_server.url, key_prefix=f"r{uuid.uuid4().hex[:8]}:")
        worker = Worker(queue, JobRunner(redeployed), block_ms=100)
        task = asyncio.create_task(worker.run_forever())
        job_id, _ = await queue.submit(job_request(params), total_steps=params.steps)
        record = await wait_for(queue, job_id, 60)
        worker.stop()
        await task
        await queue.close()
        return direct, record, params

    direct, record, params = asyncio.run(main())
    assert params.steps != 3 and params.scheduler != "euler"
    result = diffusion_pb2.GenerateResponse.FromString(record.result)
    assert result.images[0].png == direct.pngs[0]
    assert result.parameters.steps == params.steps
