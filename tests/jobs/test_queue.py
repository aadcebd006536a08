"""The Redis job queue and its worker against a real redis-server.

Every test uses its own key prefix, so tests sharing the session's Redis never see each other's
jobs. Leases are short (0.5 s) so that reclaiming a dead worker's job takes well under a second.
"""

from __future__ import annotations

import asyncio
import contextlib
import select
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from helpers import RedisServer, free_port
from helpers import running_worker as _running

from sdserve.errors import InvalidArgument, NotFound, ResourceExhausted, Unavailable
from sdserve.jobs.queue import PRIORITIES, JobQueue, JobState, wait_for
from sdserve.jobs.worker import Worker

pytestmark = pytest.mark.timeout(60)

WORKER_PROC = Path(__file__).with_name("worker_proc.py")
LEASE_S = 0.5
ORDER = {JobState.QUEUED: 0, JobState.RUNNING: 1, JobState.SUCCEEDED: 2}


def _prefix() -> str:
    return f"t{uuid.uuid4().hex[:8]}:"


def _queue(url: str, prefix: str | None = None, **kw) -> JobQueue:
    kw.setdefault("lease_s", LEASE_S)
    return JobQueue(url, key_prefix=prefix or _prefix(), **kw)


async def _echo(request: bytes, job_id: str, report) -> bytes:
    """A runner that reports 3 quick steps and returns b"done:" + the request."""
    for step in range(1, 4):
        await asyncio.sleep(0.01)
        await report(step, 3)
    return b"done:" + request


async def _wait_until(predicate, timeout_s: float, what: str):
    """Polls the async `predicate` until it returns something truthy."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = await predicate()
        if value:
            return value
        await asyncio.sleep(0.02)
    raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")


async def _left_for_a_retry(queue: JobQueue) -> list:
    """What any worker could still claim from `queue` (call it once the test's workers have
    stopped): a claim with a lease of 0, to which every pending entry's lease has run out, so it
    takes any entry a retry could start from, pending or new. Empty: no attempt can start again,
    whenever a worker looks."""
    probe = _queue(queue.url, queue.prefix, lease_s=0.0)
    try:
        return await probe.claim("probe", block_ms=1)
    finally:
        await probe.close()


def _spawn(url: str, prefix: str, mode: str, log: Path, max_attempts: int = 3):
    """Starts tests/jobs/worker_proc.py and waits for its "started" line."""
    proc = subprocess.Popen(
        [sys.executable, str(WORKER_PROC), url, prefix, str(LEASE_S), mode, str(max_attempts)],
        stdout=subprocess.PIPE,
        stderr=open(log, "ab"),  # noqa: SIM115 (the child owns it)
        text=True,
    )
    ready, _, _ = select.select([proc.stdout], [], [], 15)
    line = proc.stdout.readline() if ready else ""
    if line.strip() != "started":
        proc.kill()
        proc.wait()
        raise AssertionError(f"worker_proc did not start: {line!r}; see {log}")
    return proc


# --- the API side -------------------------------------------------------------------------


def test_idempotency_key_gives_one_job(redis_server):
    """Submitting twice with one idempotency key creates one job; another key, another job."""

    async def main():
        queue = _queue(redis_server.url)
        first, created1 = await queue.submit(b"a", total_steps=3, idempotency_key="k1")
        again, created2 = await queue.submit(b"b", total_steps=3, idempotency_key="k1")
        other, created3 = await queue.submit(b"c", total_steps=3, idempotency_key="k2")
        assert (created1, created2, created3) == (True, False, True)
        assert again == first
        assert other != first
        assert (await queue.get(first)).request == b"a"  # the repeat changed nothing
        assert (await queue.get(other)).request == b"c"
        assert sum((await queue.queue_lengths()).values()) == 2
        await queue.close()

    asyncio.run(main())


def test_full_queue_refuses_jobs_until_one_leaves(redis_server):
    """With max_queue_length=3, a 4th submit raises ResourceExhausted and creates nothing;
    cancelling a job makes room again."""

    async def main():
        queue = _queue(redis_server.url, max_queue_length=3)
        ids = [(await queue.submit(b"x", total_steps=1))[0] for _ in range(3)]
        with pytest.raises(ResourceExhausted) as info:
            await queue.submit(b"x", total_steps=1, priority="high")
        assert "jobs.max_queue_length = 3" in str(info.value)
        assert sum((await queue.queue_lengths()).values()) == 3
        assert len(await queue.redis.keys(queue.keys.job("*"))) == 3

        await queue.cancel(ids[0])
        job_id, created = await queue.submit(b"x", total_steps=1)
        assert created
        assert (await queue.get(job_id)).state is JobState.QUEUED
        assert sum((await queue.queue_lengths()).values()) == 3
        await queue.close()

    asyncio.run(main())


def test_redis_down_raises_unavailable_then_reconnects(tmp_path):
    """With no Redis listening, submit/get/cancel raise Unavailable quickly, naming
    redis-server, and create nothing; once Redis is up, the same JobQueue works."""
    port = free_port()

    async def main():
        queue = _queue(f"redis://127.0.0.1:{port}/0")
        calls = {
            "submit": lambda: queue.submit(b"x", total_steps=1),
            "get": lambda: queue.get("nope"),
            "cancel": lambda: queue.cancel("nope"),
        }
        for name, call in calls.items():
            t0 = time.monotonic()
            with pytest.raises(Unavailable) as info:
                await call()
            assert time.monotonic() - t0 < 5, name
            assert "redis-server" in str(info.value), name

        server = RedisServer(tmp_path / "redis")
        server.port = port
        server.start()
        try:
            assert await queue.queue_lengths() == dict.fromkeys(PRIORITIES, 0)
            assert await queue.redis.keys(f"{queue.prefix}*") == []
            job_id, created = await queue.submit(b"x", total_steps=1)
            assert created
            assert (await queue.get(job_id)).state is JobState.QUEUED
            await queue.close()
        finally:
            server.stop()

    asyncio.run(main())


def test_password_in_url(tmp_path):
    """A URL with the right password works; a wrong one raises Unavailable whose message
    does not reveal the password."""
    server = RedisServer(tmp_path / "redis", password="s3cret").start()

    async def main():
        queue = _queue(server.url)
        job_id, _ = await queue.submit(b"x", total_steps=1)
        assert (await queue.get(job_id)).request == b"x"
        await queue.close()

        wrong = _queue(f"redis://:wr0ngpass@127.0.0.1:{server.port}/0")
        with pytest.raises(Unavailable) as info:
            await wrong.submit(b"x", total_steps=1)
        message = str(info.value)
        assert "wr0ngpass" not in message
        assert f"redis://:***@127.0.0.1:{server.port}/0" in message
        with pytest.raises(Unavailable) as info:
            await wrong.get(job_id)
        assert "wr0ngpass" not in str(info.value)
        await wrong.close()

    try:
        asyncio.run(main())
    finally:
        server.stop()


def test_tls_url(tmp_path):
    """A rediss:// URL (TLS, the server's CA given in the URL) carries the whole job cycle; a
    plain redis:// URL to the same TLS port is refused with Unavailable."""
    server = RedisServer(tmp_path / "redis", tls=True).start()

    async def main():
        queue = _queue(server.url)
        job_id, _ = await queue.submit(b"over tls", total_steps=3)
        async with _running(Worker(queue, _echo, block_ms=100)):
            record = await wait_for(queue, job_id, 10)
        assert record.state is JobState.SUCCEEDED and record.result == b"done:over tls"
        await queue.close()

        plain = _queue(f"redis://127.0.0.1:{server.port}/0")
        with pytest.raises(Unavailable):
            await plain.submit(b"x", total_steps=1)
        await plain.close()

    try:
        asyncio.run(main())
    finally:
        server.stop()


def test_ttls_set_when_job_ends(redis_server):
    """An ended job's job/result/events/idem keys expire within result_ttl_s; a QUEUED job's
    hash never expires."""

    async def main():
        queue = _queue(redis_server.url, result_ttl_s=100)
        job_id, _ = await queue.submit(b"x", total_steps=3, idempotency_key="ttl")
        assert await queue.redis.ttl(queue.keys.job(job_id)) == -1
        assert await queue.redis.ttl(queue.keys.events(job_id)) == -1

        async with _running(Worker(queue, _echo, block_ms=100)):
            record = await wait_for(queue, job_id, 10)
        assert record.state is JobState.SUCCEEDED
        k = queue.keys
        for key in (k.job(job_id), k.result(job_id), k.events(job_id), k.idempotency("ttl")):
            ttl = await queue.redis.ttl(key)
            assert 0 < ttl <= 100, (key, ttl)

        cancelled, _ = await queue.submit(b"x", total_steps=3)
        await queue.cancel(cancelled)
        for key in (queue.keys.job(cancelled), queue.keys.events(cancelled)):
            ttl = await queue.redis.ttl(key)
            assert 0 < ttl <= 100, (key, ttl)
        await queue.close()

    asyncio.run(main())


def test_watch_yields_progress_in_order(redis_server):
    """watch() yields records whose (state, step) never go backwards, shows steps while the
    job runs, and ends with the SUCCEEDED record carrying the result."""

    async def runner(request, job_id, report):
        for step in range(1, 11):
            await asyncio.sleep(0.05)
            await report(step, 10)
        return b"image"

    async def main():
        queue = _queue(redis_server.url)
        job_id, _ = await queue.submit(b"x", total_steps=10)

        async def collect():
            records = []
            async for record in queue.watch(job_id, poll_s=0.2):
                records.append(record)
                assert len(records) < 500
            return records

        watching = asyncio.create_task(collect())
        await asyncio.sleep(0.1)
        async with _running(Worker(queue, runner, block_ms=100)):
            records = await asyncio.wait_for(watching, timeout=15)

        keys = [(ORDER[r.state], r.step) for r in records]
        assert keys == sorted(keys), keys
        assert records[0].state is JobState.QUEUED
        assert any(r.state is JobState.RUNNING and 0 < r.step < 10 for r in records), keys
        assert records[-1].state is JobState.SUCCEEDED
        assert records[-1].result == b"image"
        assert all(r.result is None for r in records[:-1])
        await queue.close()

    asyncio.run(main())


# --- the worker ---------------------------------------------------------------------------


def test_priorities_run_highest_first(redis_server):
    """Jobs waiting at several priorities run high, then normal, then low."""
    order = []

    async def runner(request, job_id, report):
        order.append(request.decode())
        return b""

    async def main():
        queue = _queue(redis_server.url)
        ids = [(await queue.submit(p.encode(), total_steps=1, priority=p))[0]
               for p in ("low", "normal", "high")]  # fmt: skip
        async with _running(Worker(queue, runner, concurrency=1, block_ms=100)):
            for job_id in ids:
                assert (await wait_for(queue, job_id, 10)).state is JobState.SUCCEEDED
        await queue.close()

    asyncio.run(main())
    assert order == ["high", "normal", "low"]


def test_cancel_queued_job_never_runs(redis_server):
    """A QUEUED job cancelled is CANCELLED at once, and a worker started later skips it."""
    ran = []

    async def runner(request, job_id, report):
        ran.append(job_id)
        return b""

    async def main():
        queue = _queue(redis_server.url)
        doomed, _ = await queue.submit(b"x", total_steps=1)
        record = await queue.cancel(doomed)
        assert record.state is JobState.CANCELLED
        assert record.cancel_requested
        later, _ = await queue.submit(b"y", total_steps=1)
        async with _running(Worker(queue, runner, block_ms=100)):
            assert (await wait_for(queue, later, 10)).state is JobState.SUCCEEDED
        record = await queue.get(doomed)
        assert record.state is JobState.CANCELLED
        assert record.attempts == 0
        await queue.close()
        return doomed, later

    doomed, later = asyncio.run(main())
    assert ran == [later]


def test_cancel_reaches_a_running_job_that_reports_no_steps(redis_server):
    """Steps are reported seldom (jobs.progress_interval_s); CancelJob still stops a running
    job at once: the worker blocks on the job's events stream, which CancelJob writes to."""
    state = {"runner_cancelled": False}

    async def runner(request, job_id, report):
        try:
            await asyncio.sleep(30)  # a long step, no report
            return b"finished"
        except asyncio.CancelledError:
            state["runner_cancelled"] = True
            raise

    async def main():
        queue = _queue(redis_server.url, lease_s=30.0)  # renewals are 10 s apart
        job_id, _ = await queue.submit(b"x", total_steps=1)
        async with _running(Worker(queue, runner, block_ms=100)):
            while (await queue.get(job_id)).state is not JobState.RUNNING:
                await asyncio.sleep(0.01)
            started = time.monotonic()
            await queue.cancel(job_id)
            record = await wait_for(queue, job_id, 10)
            took = time.monotonic() - started
        await queue.close()
        return record, took

    record, took = asyncio.run(main())
    assert record.state is JobState.CANCELLED and record.result is None
    assert state["runner_cancelled"]
    assert took < 2.0, took


def test_cancel_running_job_stops_it(redis_server):
    """Cancelling a RUNNING job stops its runner at the next step: the job ends CANCELLED
    with no result, and at most one more step is reported."""
    reported_after_cancel = []
    state = {"cancel_returned": False, "runner_cancelled": False}

    async def runner(request, job_id, report):
        try:
            for step in range(1, 51):
                await asyncio.sleep(0.1)
                if state["cancel_returned"]:
                    reported_after_cancel.append(step)
                await report(step, 50)
            return b"finished"
        except asyncio.CancelledError:
            state["runner_cancelled"] = True
            raise

    async def main():
        queue = _queue(redis_server.url)
        job_id, _ = await queue.submit(b"x", total_steps=50)
        worker = Worker(queue, runner, block_ms=100)
        async with _running(worker):

            async def running():
                record = await queue.get(job_id)
                return record.state is JobState.RUNNING and record.step >= 2

            await _wait_until(running, 10, "the job to run")
            record = await queue.cancel(job_id)
            state["cancel_returned"] = True
            assert record.state is JobState.RUNNING
            assert record.cancel_requested
            record = await wait_for(queue, job_id, 5)
        assert record.state is JobState.CANCELLED
        assert record.result is None
        assert record.step < 50
        assert await queue.redis.exists(queue.keys.result(job_id)) == 0
        assert worker.counts["cancelled"] == 1
        await queue.close()

    asyncio.run(main())
    assert state["runner_cancelled"]
    assert len(reported_after_cancel) <= 1, reported_after_cancel


def test_a_runner_that_ignores_its_cancellation_is_settled_anyway(redis_server):
    """A stage call that swallows the cancellation (a Serve stream was seen to run on for
    seconds) must not keep a cancelled job RUNNING: it ends CANCELLED within the lease, and the
    attempt records no further step."""
    reported = []  # every step the runner reported, before and after its cancellation
    seen_enough = asyncio.Event()  # the test is done: the runner may end (it ignores cancel)

    async def runner(request, job_id, report):
        for step in range(1, 201):
            with contextlib.suppress(asyncio.CancelledError):  # the misbehaving call goes on
                await asyncio.sleep(0.05)
            if seen_enough.is_set():
                break
            await report(step, 200)
            reported.append(step)
        return b"finished"

    async def main():
        queue = _queue(redis_server.url)
        job_id, _ = await queue.submit(b"x", total_steps=200)
        worker = Worker(queue, runner, block_ms=100)
        async with _running(worker):

            async def running():
                record = await queue.get(job_id)
                return record.state is JobState.RUNNING and record.step >= 2

            await _wait_until(running, 10, "the job to run")
            at_cancel = (await queue.cancel(job_id)).step
            record = await wait_for(queue, job_id, queue.lease_s)
            assert record.state is JobState.CANCELLED and record.result is None
            settled = len(reported)

            async def reported_five_more():  # the abandoned attempt goes on
                return len(reported) >= settled + 5

            await _wait_until(reported_five_more, 10, "the abandoned attempt to report 5 steps")
            # ... and records none of them: the job's step is where cancelling left it
            assert (await queue.get(job_id)).step == record.step <= at_cancel + 2
            seen_enough.set()
        await queue.close()

    asyncio.run(main())


def test_invalid_argument_fails_at_once(redis_server):
    """A runner raising InvalidArgument fails the job at its first attempt, naming the field."""
    entered = []

    async def runner(request, job_id, report):
        entered.append(job_id)
        raise InvalidArgument("prompt", "bad")

    async def main():
        queue = _queue(redis_server.url)
        job_id, _ = await queue.submit(b"x", total_steps=1)
        async with _running(Worker(queue, runner, block_ms=100)) as worker:
            record = await wait_for(queue, job_id, 10)
        assert record.state is JobState.FAILED
        assert record.attempts == 1 and worker.counts["started"] == 1
        assert await _left_for_a_retry(queue) == []  # so no retry can ever start
        assert "INVALID_ARGUMENT" in record.error
        assert "prompt: bad" in record.error
        assert sum((await queue.queue_lengths()).values()) == 0
        await queue.close()

    asyncio.run(main())
    assert len(entered) == 1


def test_transient_error_is_retried(redis_server):
    """A runner failing with RuntimeError on its first attempt only succeeds on attempt 2."""
    attempts = []

    async def runner(request, job_id, report):
        attempts.append(job_id)
        if len(attempts) == 1:
            raise RuntimeError("flaky")
        return b"ok"

    async def main():
        queue = _queue(redis_server.url)
        job_id, _ = await queue.submit(b"x", total_steps=1)
        async with _running(Worker(queue, runner, block_ms=100)):
            record = await wait_for(queue, job_id, 10)
        assert record.state is JobState.SUCCEEDED
        assert record.attempts == 2
        assert record.result == b"ok"
        await queue.close()

    asyncio.run(main())
    assert len(attempts) == 2


def test_persistent_error_fails_after_max_attempts(redis_server):
    """A runner that always raises RuntimeError ends FAILED after max_attempts, with the last
    attempt's error in the message."""
    attempts = []

    async def runner(request, job_id, report):
        attempts.append(job_id)
        raise RuntimeError(f"boom {len(attempts)}")

    async def main():
        queue = _queue(redis_server.url, max_attempts=3)
        job_id, _ = await queue.submit(b"x", total_steps=1)
        worker = Worker(queue, runner, block_ms=100)
        async with _running(worker):
            record = await wait_for(queue, job_id, 15)
        assert record.state is JobState.FAILED
        assert record.attempts == 3 and worker.counts["started"] == 3
        assert await _left_for_a_retry(queue) == []  # so no 4th attempt can ever start
        assert "boom 3" in record.error
        assert "RuntimeError" in record.error
        assert worker.counts["dead_lettered"] == 1 and worker.counts["retried"] == 2
        assert sum((await queue.queue_lengths()).values()) == 0
        await queue.close()

    asyncio.run(main())
    assert len(attempts) == 3


def test_job_longer_than_lease_runs_once(redis_server):
    """A job running for 5 leases, renewed by its worker, is not taken by an idle second one."""
    entered = []

    async def runner(request, job_id, report):
        entered.append(job_id)
        for step in range(1, 11):
            await asyncio.sleep(0.25)
            await report(step, 10)
        return b"long"

    async def main():
        prefix = _prefix()
        queues = [_queue(redis_server.url, prefix) for _ in range(2)]
        job_id, _ = await queues[0].submit(b"x", total_steps=10)
        workers = [
            Worker(q, runner, consumer=f"w{i}", concurrency=1, block_ms=100)
            for i, q in enumerate(queues)
        ]
        async with _running(workers[0]), _running(workers[1]):
            record = await wait_for(queues[0], job_id, 15)
        assert record.state is JobState.SUCCEEDED
        assert record.attempts == 1
        assert record.result == b"long"
        assert sum(w.counts["lost"] for w in workers) == 0
        for q in queues:
            await q.close()

    asyncio.run(main())
    assert len(entered) == 1


def test_sigkilled_worker_job_is_taken_over(redis_server, tmp_path):
    """A job whose worker process is SIGKILLed mid-job is run again by another worker after
    the lease; the stored result is the second worker's."""

    async def second(request, job_id, report):
        for step in range(1, 4):
            await report(step, 3)
        return b"second:" + request

    async def main():
        prefix = _prefix()
        queue = _queue(redis_server.url, prefix)
        job_id, _ = await queue.submit(b"req", total_steps=20)
        proc = _spawn(redis_server.url, prefix, "slow", tmp_path / "worker.log")
        try:

            async def running():
                record = await queue.get(job_id)
                return record.state is JobState.RUNNING and record.step >= 2

            await _wait_until(running, 10, "the subprocess worker to run the job")
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
        record = await queue.get(job_id)
        assert record.state is JobState.RUNNING
        assert record.attempts == 1

        async with _running(Worker(queue, second, consumer="second", block_ms=100)):
            record = await wait_for(queue, job_id, 10)
        assert record.state is JobState.SUCCEEDED
        assert record.attempts == 2
        assert record.worker == "second"
        assert record.result == b"second:req"
        await queue.close()

    asyncio.run(main())


def test_job_that_kills_its_worker_fails_after_max_attempts(redis_server, tmp_path):
    """A job that SIGKILLs every worker running it is FAILED (dead-lettered) by the worker
    after the 3rd: 3 workers die running it and a 4th marks it FAILED without running it."""
    max_attempts = 3

    async def main():
        prefix = _prefix()
        queue = _queue(redis_server.url, prefix, max_attempts=max_attempts)
        job_id, _ = await queue.submit(b"poison", total_steps=1)
        spawned = died = 0
        for _ in range(max_attempts + 3):  # a supervisor restarting the worker
            if (await queue.get(job_id)).state.ended:
                break
            proc = _spawn(redis_server.url, prefix, "crash", tmp_path / "worker.log", max_attempts)
            spawned += 1
            try:

                async def settled(proc=proc):
                    return proc.poll() is not None or (await queue.get(job_id)).state.ended

                await _wait_until(settled, 15, "the worker to die or the job to end")
                if proc.poll() is not None:
                    assert proc.returncode == -signal.SIGKILL
                    died += 1
            finally:
                if proc.poll() is None:
                    proc.kill()
                proc.wait()

        record = await queue.get(job_id)
        assert record.state is JobState.FAILED
        assert record.attempts == max_attempts
        assert "3 attempts" in record.error
        assert (died, spawned) == (3, 4)
        assert sum((await queue.queue_lengths()).values()) == 0
        await queue.close()

    asyncio.run(main())


# --- Redis restarts -----------------------------------------------------------------------


def test_queued_jobs_survive_redis_kill(tmp_path):
    """Jobs queued before Redis is SIGKILLed and restarted (append-only file) all run, once."""
    server = RedisServer(tmp_path / "redis").start()
    entered = []

    async def runner(request, job_id, report):
        entered.append(job_id)
        return b"done:" + request

    async def main():
        queue = _queue(server.url)
        ids = [(await queue.submit(str(i).encode(), total_steps=1))[0] for i in range(10)]
        server.kill()
        server.start()
        async with _running(Worker(queue, runner, block_ms=100)):
            for i, job_id in enumerate(ids):
                record = await wait_for(queue, job_id, 15)
                assert record.state is JobState.SUCCEEDED
                assert record.attempts == 1
                assert record.result == f"done:{i}".encode()
        await queue.close()
        return ids

    try:
        ids = asyncio.run(main())
    finally:
        server.stop()
    assert sorted(entered) == sorted(ids)


def test_worker_rides_out_redis_restart(tmp_path):
    """A worker running while Redis is killed and restarted a second later reconnects: jobs
    submitted before and after the restart all succeed."""
    server = RedisServer(tmp_path / "redis").start()

    async def runner(request, job_id, report):
        for step in range(1, 6):
            await asyncio.sleep(0.05)
            await report(step, 5)
        return b"done:" + request

    async def main():
        prefix = _prefix()
        api = _queue(server.url, prefix)
        worker_queue = _queue(server.url, prefix)
        before = [(await api.submit(b"before", total_steps=5))[0] for _ in range(5)]
        worker = Worker(worker_queue, runner, concurrency=2, block_ms=100)
        async with _running(worker):
            await asyncio.sleep(0.2)
            server.kill()
            await asyncio.sleep(1.0)
            server.start()
            after = [(await api.submit(b"after", total_steps=5))[0] for _ in range(5)]
            for job_id, expected in [(j, b"done:before") for j in before] + [
                (j, b"done:after") for j in after
            ]:
                record = await wait_for(api, job_id, 20)
                assert record.state is JobState.SUCCEEDED, record.error
                assert record.result == expected
        await api.close()
        await worker_queue.close()

    try:
        asyncio.run(main())
    finally:
        server.stop()


def test_unknown_job_is_not_found(redis_server):
    """get and cancel of a job id that never existed raise NotFound."""

    async def main():
        queue = _queue(redis_server.url)
        with pytest.raises(NotFound):
            await queue.get("missing")
        with pytest.raises(NotFound):
            await queue.cancel("missing")
        await queue.close()

    asyncio.run(main())


def test_stop_drains_running_jobs_and_leaves_queued_ones(redis_server):
    """stop() (what a JobWorker replica does when Serve removes it) lets the running job finish
    and store its result, takes nothing new, and leaves the queued job in Redis."""

    async def slow(request, job_id, report):
        for step in range(1, 11):
            await asyncio.sleep(0.1)
            await report(step, 10)
        return b"drained:" + request

    async def main():
        queue = _queue(redis_server.url)
        first, _ = await queue.submit(b"a", total_steps=10)
        second, _ = await queue.submit(b"b", total_steps=10)
        worker = Worker(queue, slow, concurrency=1, block_ms=100)
        task = asyncio.create_task(worker.run_forever())

        async def running():
            return worker.running == 1 and (await queue.get(first)).step >= 2

        await _wait_until(running, 10, "the first job to run")
        worker.stop()
        await asyncio.wait_for(task, timeout=10)
        done = await queue.get(first)
        assert done.state is JobState.SUCCEEDED and done.result == b"drained:a"
        left = await queue.get(second)
        assert left.state is JobState.QUEUED and left.attempts == 0
        assert worker.running == 0
        await queue.close()

    asyncio.run(main())
