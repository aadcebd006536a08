"""The job worker loop: claims jobs from the queue and runs them, `concurrency` at a time.

It knows nothing of Ray or the pipeline: it is given a `run(request, job_id, report)` coroutine
that turns a serialized request into a serialized result and calls `report(step, total)` after
each denoising step. The JobWorker deployment gives it the stage path that `Generate` uses; the
tests give it runners that sleep, fail or kill their own process.

Per job: start an attempt (the queue settles jobs that ended, were cancelled or used up their
attempts), renew its lease every `lease_s / 3` while it runs, stop it when a cancel request or
a lost lease is seen (at the next step report or renewal) or when it has run `timeout_s`, then
end it: the result is stored and the entry acknowledged in one step. A failure the request
caused (INVALID_ARGUMENT...) fails the job at once; any other failure, and an attempt stopped
at `timeout_s`, is retried, after the lease, up to `max_attempts`.

A slot is one runner: a stopped attempt's job is settled within `lease_s / 2` even if its
runner does not hand the cancellation back at once, but the slot takes no new job until that
runner has ended, so that no more than `concurrency` runners ever run (each holds a Denoiser
batch slot and a Redis connection).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import socket
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable

from redis.backoff import EqualJitterBackoff
from redis.exceptions import ResponseError

from sdserve.errors import SdserveError, Unavailable
from sdserve.jobs.queue import JobQueue
from sdserve.jobs.records import Delivery, JobState, Lease, Outcome
from sdserve.metrics import StatsLogger
from sdserve.stats import JobEvent

logger = logging.getLogger(__name__)

Report = Callable[[int, int], Awaitable[None]]
Runner = Callable[[bytes, str, Report], Awaitable[bytes]]

PERMANENT_ERRORS = frozenset(
    {"INVALID_ARGUMENT", "FAILED_PRECONDITION", "NOT_FOUND", "DEADLINE_EXCEEDED"}
)
"""Error codes a retry cannot fix: the job fails at its first attempt. (An attempt the worker
stops at `timeout_s` is retried instead: a hung stage is not the request's fault.)"""


def consumer_name() -> str:
    """host:pid:random, unique per worker; it is recorded on the jobs it runs."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"


ENDED, STOPPED, TIMED_OUT = "ended", "stopped", "timed out"
"""How an attempt's wait ended: its runner returned or raised; a cancel request or a lost lease
stopped it; it ran past `timeout_s`."""

RECONNECT = EqualJitterBackoff(cap=5.0, base=0.1)
"""The wait before the next try while Redis is unreachable: `compute(failures)` is 0.1 s doubling
per failure up to 5 s, drawn from its upper half (redis-py's equal jitter). Failures count from
0 and start again after a success."""


class _AttemptWatch:
    """What one attempt hears while it runs: it renews the lease every `lease_s / 3`, hears
    CancelJob at once, and reports steps; `stopped` is set once a cancel request or a lost lease
    is seen (`lost` tells which)."""

    def __init__(self, queue: JobQueue, delivery: Delivery, consumer: str, token: int):
        self.queue, self.delivery, self.consumer, self.token = queue, delivery, consumer, token
        self.stopped = asyncio.Event()
        self.lost = False

    def seen(self, answer: Lease) -> None:
        if answer is Lease.LOST:
            self.lost = True
            self.stopped.set()
        elif answer is Lease.CANCEL_REQUESTED:
            self.stopped.set()

    async def report(self, step: int, total: int) -> None:
        """The attempt's `Report`."""
        if self.stopped.is_set():  # cancelled or lost: this attempt records no more steps
            return
        # Progress is best effort; the lease decides who owns the job.
        with contextlib.suppress(Unavailable):
            self.seen(await self.queue.progress(self.delivery, self.token, step, total))

    async def renew(self) -> None:
        while True:
            await asyncio.sleep(self.queue.lease_s / 3)
            with contextlib.suppress(Unavailable):
                self.seen(await self.queue.renew(self.delivery, self.consumer, self.token))

    async def watch_cancel(self) -> None:
        """Steps may be reported seldom: this hears CancelJob at once."""
        while True:
            try:
                await self.queue.wait_for_cancel(self.delivery.job_id)
                self.seen(Lease.CANCEL_REQUESTED)
                return
            except Unavailable:
                await asyncio.sleep(self.queue.lease_s / 3)


class Worker:
    def __init__(
        self,
        queue: JobQueue,
        run: Runner,
        *,
        consumer: str | None = None,
        concurrency: int = 4,
        block_ms: int = 1000,
        stats: StatsLogger | None = None,
        timeout_s: float = 0.0,
    ):
        self.queue = queue
        self.run = run
        self.consumer = consumer or consumer_name()
        self.concurrency = concurrency
        self.timeout_s = timeout_s
        """An attempt still running after this many seconds is cancelled and retried (the last
        one dead-lettered): renewing the lease would otherwise keep a hung runner forever. 0:
        no limit (`jobs.timeout_s`)."""
        self.block_ms = block_ms
        self.stats = stats or StatsLogger()
        """Receives a `JobEvent` for everything the worker does (sdserve.stats.JOB_EVENTS)."""
        self._stopping = asyncio.Event()
        self._redis_down_since: float | None = None
        self.running = 0
        """Jobs being run now."""

    async def run_forever(self) -> None:
        """Runs `concurrency` slots until `stop()`; each claims and runs one job at a time."""
        logger.info(
            "job worker %s: %d slot(s) on %s (lease %gs, at most %d attempts)",
            self.consumer, self.concurrency, self.queue.prefix, self.queue.lease_s,
            self.queue.max_attempts,
        )  # fmt: skip
        await asyncio.gather(*(self._slot() for _ in range(self.concurrency)))

    def stop(self) -> None:
        """Slots finish their current job and stop claiming (within `block_ms`); then
        `run_forever` returns. Jobs still queued stay in Redis."""
        self._stopping.set()

    async def _slot(self) -> None:
        failures = 0
        backlog: list[Delivery] = []
        while not self._stopping.is_set():
            try:
                if not backlog:
                    backlog = await self.queue.claim(self.consumer, block_ms=self.block_ms)
                    self._redis_back()
                if backlog:
                    await self._process(backlog.pop(0))
            except Unavailable as exc:
                self._redis_lost(exc)
            except ResponseError as exc:
                if "NOGROUP" in str(exc):  # Redis came back empty: recreate the groups
                    logger.warning("job worker %s: consumer group missing; recreating it",
                                   self.consumer)  # fmt: skip
                    await self._quietly(self.queue.ensure_groups())
                else:
                    logger.exception("job worker %s: Redis error", self.consumer)
            except Exception:
                logger.exception("job worker %s: unexpected error", self.consumer)
            else:
                failures = 0
                continue
            await asyncio.sleep(RECONNECT.compute(failures))
            failures += 1

    def _redis_lost(self, exc: Exception) -> None:
        if self._redis_down_since is None:
            self._redis_down_since = time.monotonic()
            logger.warning("job worker %s: %s; retrying with backoff", self.consumer, exc)

    def _redis_back(self) -> None:
        if self._redis_down_since is not None:
            down = time.monotonic() - self._redis_down_since
            self._redis_down_since = None
            logger.warning("job worker %s: Redis is back after %.1fs", self.consumer, down)

    @property
    def counts(self) -> Counter[str]:
        """How often each of `sdserve.stats.JOB_EVENTS` happened (the stats logger's count)."""
        return self.stats.jobs

    def _count(self, name: str) -> None:
        self.stats.record(JobEvent(name))

    @staticmethod
    async def _quietly(coro) -> None:
        try:
            await coro
        except Exception as exc:  # retried by the caller's loop
            logger.debug("ignored: %s", exc)

    async def _process(self, delivery: Delivery) -> None:
        started = await self.queue.start(delivery, self.consumer)
        job = delivery.job_id
        if not started.token:
            logger.info("job %s: not run (%s)", job, started.reason)
            if started.reason == "FAILED":  # it had used up its attempts
                self._count("failed")
                self._count("dead_lettered")
            return
        token = started.token
        self._count("started")
        self.running += 1
        try:
            await self._attempt(delivery, token, started.request)
        finally:
            self.running -= 1

    async def _attempt(self, delivery: Delivery, token: int, request: bytes) -> None:
        """Runs one attempt until it ends, is cancelled, loses its lease or times out; ends it,
        then returns only once its runner has ended (the slot is taken until then)."""
        job = delivery.job_id
        logger.info("job %s: attempt %d on %s", job, token, self.consumer)
        t0 = time.perf_counter()
        watch = _AttemptWatch(self.queue, delivery, self.consumer, token)
        run = asyncio.create_task(self.run(request, job, watch.report))
        try:
            why = await self._run_watched(watch, run)
        except asyncio.CancelledError:  # this worker is shut down: the lease then runs out,
            run.cancel()  # and another worker takes the job over
            await asyncio.wait({run}, timeout=self.queue.lease_s / 2)
            run.add_done_callback(_consume)
            raise
        try:
            if watch.lost:
                self._count("lost")
                logger.warning("job %s: attempt %d lost its lease to another worker", job, token)
            else:
                await self._settle(delivery, token, run, why, time.perf_counter() - t0)
        finally:
            await asyncio.wait({run})
            _consume(run)

    async def _run_watched(self, watch: _AttemptWatch, run: asyncio.Task) -> str:
        """Waits for the attempt while `watch` renews its lease and listens for CancelJob.
        Returns ENDED, or STOPPED (a cancel request or a lost lease) or TIMED_OUT, the runner
        then cancelled and given `lease_s / 2` to end."""
        helpers = [asyncio.create_task(watch.renew()), asyncio.create_task(watch.watch_cancel())]
        stopped = asyncio.create_task(watch.stopped.wait())
        try:
            done, _ = await asyncio.wait({run, stopped}, timeout=self.timeout_s or None,
                                         return_when=asyncio.FIRST_COMPLETED)  # fmt: skip
        finally:
            for helper in [*helpers, stopped]:
                helper.cancel()
        if run in done:
            return ENDED
        run.cancel()
        # A cancelled stage call does not always hand the cancellation back at once (a Serve
        # stream was seen to run on for seconds): wait a little, then settle the job anyway.
        await asyncio.wait({run}, timeout=self.queue.lease_s / 2)
        return STOPPED if stopped in done else TIMED_OUT

    async def _settle(self, delivery: Delivery, token: int, run: asyncio.Task, why: str,
                      took: float) -> None:  # fmt: skip
        """Ends an attempt that kept its lease: cancelled (a cancel request stopped it),
        succeeded, failed for good (a `PERMANENT_ERRORS` code), or to be retried (any other
        error, a runner that ended cancelled on its own, or a time-out)."""
        job = delivery.job_id
        if why == STOPPED:
            await self._end(delivery, token, Outcome.CANCELLED, error="cancelled by CancelJob")
            logger.info("job %s: cancelled after %.2fs", job, took)
            return
        if why == TIMED_OUT:
            limit = f"jobs.timeout_s = {self.timeout_s:g}s"
            await self._retry(delivery, token, f"DEADLINE_EXCEEDED: attempt {token} ran past "
                              f"{limit} and was cancelled")  # fmt: skip
            return
        if run.cancelled():  # e.g. a stage call cancelled under it: transient, like an error
            await self._retry(delivery, token, f"attempt {token}: its runner ended cancelled")
            return
        exc = run.exception()
        if exc is None:
            await self._end(delivery, token, Outcome.SUCCEEDED, result=run.result())
            logger.info("job %s: succeeded in %.2fs", job, took)
        elif isinstance(exc, SdserveError) and exc.code in PERMANENT_ERRORS:
            await self._end(delivery, token, Outcome.FAILED, error=f"{exc.code}: {exc}")
            logger.info("job %s: failed: %s", job, exc)
        else:
            await self._retry(delivery, token, f"attempt {token}: {type(exc).__name__}: {exc}",
                              exc)  # fmt: skip

    async def _retry(self, delivery: Delivery, token: int, error: str,
                     exc: BaseException | None = None) -> None:  # fmt: skip
        """Puts the job back for another attempt, or dead-letters it after its last."""
        state = await self._end(delivery, token, Outcome.RETRY, error=error)
        logger.warning("job %s: %s (now %s)", delivery.job_id, error,
                       state.value if state else "lost", exc_info=exc)  # fmt: skip
        if state is JobState.FAILED:  # that was its last attempt
            self._count("dead_lettered")

    async def _end(self, delivery: Delivery, token: int, outcome: Outcome, **kw) -> JobState | None:
        """Ends the attempt, retrying while Redis is down, and counts what happened. If Redis
        stays down past the lease, another worker may run the job again (at least once); this
        write is then refused. Returns the job's new state (None if the attempt lost it)."""
        deadline = time.monotonic() + max(60.0, 3 * self.queue.lease_s)
        for failures in itertools.count():
            try:
                state = await self.queue.end(delivery, token, outcome, **kw)
                if state is None:
                    self._count("lost")
                    logger.warning("job %s: attempt %d had lost the job; its %s is dropped",
                                   delivery.job_id, token, outcome.value)  # fmt: skip
                else:
                    self._count("retried" if state is JobState.QUEUED else state.value.lower())
                return state
            except Unavailable as exc:
                self._redis_lost(exc)
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(RECONNECT.compute(failures))


def _consume(task: asyncio.Task) -> None:
    """Retrieves an abandoned attempt's outcome, so that asyncio does not warn about it."""
    if not task.cancelled():
        task.exception()
