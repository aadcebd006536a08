"""The job worker keeps its limits against runners that misbehave (issue 27): an attempt ends at
`jobs.timeout_s`, a cancelled attempt holds its slot until its runner has really ended, and a
runner that ends cancelled does not stop the slot. Against the session's real redis-server, each
test under its own key prefix, with short leases."""

from __future__ import annotations

import asyncio
import uuid

import pytest
from helpers import running_worker as _running

from sdserve.jobs.queue import JobQueue, JobState, wait_for
from sdserve.jobs.worker import Worker

pytestmark = pytest.mark.timeout(30)


def _queue(url: str, **kw) -> JobQueue:
    kw.setdefault("lease_s", 0.4)
    return JobQueue(url, key_prefix=f"t{uuid.uuid4().hex[:8]}:", **kw)


def test_a_runner_that_never_ends_is_stopped_at_timeout_s_then_dead_lettered(redis_server):
    """A runner that never returns (a stage that hangs) is cancelled at `timeout_s`, and the job
    is retried as its attempts allow, then FAILED with a DEADLINE_EXCEEDED error."""
    cancelled = []

    async def hangs(request, job_id, report):
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            cancelled.append(job_id)
            raise

    async def main():
        queue = _queue(redis_server.url, max_attempts=2, lease_s=0.3)
        job_id, _ = await queue.submit(b"x", total_steps=1)
        async with _running(Worker(queue, hangs, block_ms=50, timeout_s=0.2)) as worker:
            record = await wait_for(queue, job_id, 3)
        await queue.close()
        return record, worker

    record, worker = asyncio.run(main())
    assert record.state is JobState.FAILED and record.attempts == 2
    assert "DEADLINE_EXCEEDED" in record.error and "jobs.timeout_s" in record.error
    assert len(cancelled) == 2
    assert worker.counts["retried"] == 1 and worker.counts["dead_lettered"] == 1


def test_a_cancelled_attempt_keeps_its_slot_until_its_runner_ends(redis_server):
    """With concurrency 1, a cancelled attempt whose runner ignores the cancellation for a while
    (longer than the worker waits before settling the job) keeps the next job from starting
    until it has ended: never two runners at once."""
    active, most = [0], [0]

    async def runner(request, job_id, report):
        active[0] += 1
        most[0] = max(most[0], active[0])
        try:
            if request == b"slow":
                try:
                    await asyncio.Event().wait()
                except asyncio.CancelledError:  # a stage call that hands it back late
                    await asyncio.shield(asyncio.sleep(0.5))
                    raise
            return b"ok"
        finally:
            active[0] -= 1

    async def main():
        queue = _queue(redis_server.url)  # the worker settles a stopped job after 0.2 s
        slow, _ = await queue.submit(b"slow", total_steps=1)
        async with _running(Worker(queue, runner, block_ms=50, concurrency=1)):
            for _ in range(100):
                if (await queue.get(slow)).state is JobState.RUNNING:
                    break
                await asyncio.sleep(0.01)
            quick, _ = await queue.submit(b"quick", total_steps=1)
            await queue.cancel(slow)
            assert (await wait_for(queue, slow, 2)).state is JobState.CANCELLED
            record = await wait_for(queue, quick, 3)
        await queue.close()
        return record

    record = asyncio.run(main())
    assert record.state is JobState.SUCCEEDED
    assert most[0] == 1


def test_a_runner_that_ends_cancelled_does_not_stop_the_slot(redis_server):
    """A runner that raises CancelledError on its own (a stage call cancelled under it) fails
    that attempt like any other error; the slot goes on running the next jobs."""

    async def runner(request, job_id, report):
        if request == b"cancelled":
            raise asyncio.CancelledError()
        return b"ok:" + request

    async def main():
        queue = _queue(redis_server.url, max_attempts=1)
        first, _ = await queue.submit(b"cancelled", total_steps=1)
        later = [(await queue.submit(b"%d" % i, total_steps=1))[0] for i in range(2)]
        async with _running(Worker(queue, runner, block_ms=50, concurrency=1)):
            records = [await wait_for(queue, job, 3) for job in [first, *later]]
        await queue.close()
        return records

    failed, *succeeded = asyncio.run(main())
    assert failed.state is JobState.FAILED and "cancelled" in failed.error.lower()
    assert [r.state for r in succeeded] == [JobState.SUCCEEDED] * 2
