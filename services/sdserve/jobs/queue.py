"""The job queue on Redis: at-least-once delivery that never loses an accepted job.

The keys are described in `keys.py`. A worker owns a job while the job's stream entry is in its
pending list. It renews that lease (XCLAIM ... JUSTID, which resets the entry's idle time) every
`lease_s / 3` while the job runs; an entry idle for longer than `lease_s` belongs to a dead
worker and is reclaimed with XAUTOCLAIM. Each start increments `attempts`, and that number is
the fencing token of the attempt: progress, renewals and the final write of an attempt that lost
its job to another worker change nothing. After `max_attempts` starts without an end, the job is
FAILED (the dead letter).

Every state change is one Lua script (`lua/*.lua`, each documenting its KEYS and ARGV), so it is
atomic on the server. Request and result are opaque bytes here (serialized protobuf messages,
written and read at the edges).
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator
from importlib import resources

from redis.exceptions import ResponseError

from sdserve.errors import NotFound, ResourceExhausted
from sdserve.jobs import connection
from sdserve.jobs.keys import GROUP, PRIORITIES, Keys
from sdserve.jobs.records import Delivery, JobRecord, JobState, Lease, Outcome, Started

logger = logging.getLogger(__name__)

__all__ = ["JobQueue", "JobRecord", "JobState", "Lease", "Outcome", "PRIORITIES", "wait_for"]

SCRIPTS = ("submit", "start", "renew", "progress", "end", "cancel")
"""One Lua script per state change, in `lua/NAME.lua`."""
USES_HELPERS = ("start", "progress", "end", "cancel")
"""Scripts that call the helpers of `lua/helpers.lua` (prepended to them)."""


def lua_source(name: str) -> str:
    """The source of script `name`, with the shared helpers prepended where it uses them."""
    folder = resources.files("sdserve.jobs") / "lua"
    source = (folder / f"{name}.lua").read_text()
    if name in USES_HELPERS:
        source = (folder / "helpers.lua").read_text() + source
    return source


class JobQueue:
    """Client of the job queue: submit/get/watch/cancel for the API, and the worker's side
    (claim, start, renew, progress, end). One per process; safe to share between tasks.

    Every method raises `Unavailable` when Redis cannot be reached.
    """

    def __init__(
        self,
        url: str,
        *,
        key_prefix: str = "sdserve:",
        result_ttl_s: int = 24 * 3600,
        max_queue_length: int = 10_000,
        max_attempts: int = 3,
        lease_s: float = 30.0,
        max_connections: int = 64,
        connection_wait_s: float = 2.0,
    ):
        self.url = url
        self.keys = Keys(key_prefix)
        self.result_ttl_s = result_ttl_s
        self.max_queue_length = max_queue_length
        self.max_attempts = max_attempts
        self.lease_s = lease_s
        self.redis = connection.connect(url, max_connections, connection_wait_s)
        self.streams = self.keys.queues
        self._scripts = {name: self.redis.register_script(lua_source(name)) for name in SCRIPTS}
        self._groups_ready = False

    @property
    def prefix(self) -> str:
        return self.keys.prefix

    @classmethod
    def from_config(cls, jobs) -> JobQueue:
        """From the config tree's `jobs` section (`sdserve.config.JobsConfig`)."""
        return cls(
            jobs.redis_url,
            key_prefix=jobs.key_prefix,
            result_ttl_s=jobs.result_ttl_s,
            max_queue_length=jobs.max_queue_length,
            max_attempts=jobs.max_attempts,
            lease_s=jobs.lease_s,
            max_connections=jobs.max_connections,
            connection_wait_s=jobs.connection_wait_s,
        )

    async def close(self) -> None:
        await self.redis.aclose()

    async def _call(self, coro):
        """Awaits a Redis call, turning "Redis is down" into Unavailable."""
        return await connection.call(self.url, coro)

    async def ping(self) -> None:
        await self._call(self.redis.ping())

    async def ensure_groups(self) -> None:
        """Creates the consumer group on every priority stream (idempotent)."""
        for stream in self.streams:
            try:
                await self._call(self.redis.xgroup_create(stream, GROUP, id="0", mkstream=True))
            except ResponseError as exc:
                if "BUSYGROUP" not in str(exc):
                    raise
        self._groups_ready = True

    # --- the API side -----------------------------------------------------------------------

    async def submit(
        self,
        request: bytes,
        *,
        total_steps: int,
        priority: str = "normal",
        idempotency_key: str | None = None,
        tenant: str = "",
        callback_url: str = "",
    ) -> tuple[str, bool]:
        """Enqueues a job for `tenant`. Returns (job id, created); created is False when
        `idempotency_key` named an existing job of that tenant, whose id is returned.

        Raises:
            ResourceExhausted: `max_queue_length` jobs are waiting or running.
            Unavailable: Redis does not answer; no job was created.
        """
        if priority not in PRIORITIES:
            raise ValueError(f"unknown priority {priority!r}")
        if not self._groups_ready:
            await self.ensure_groups()
        job_id = uuid.uuid4().hex
        stream = self.keys.queue(priority)
        try:
            job, created = await self._call(
                self._scripts["submit"](
                    keys=[
                        self.keys.job(job_id),
                        self.keys.events(job_id),
                        stream,
                        self.keys.idempotency(idempotency_key or "", tenant),
                        self.keys.tenant_jobs(tenant),
                        *self.streams,
                    ],
                    args=[
                        job_id,
                        request,
                        priority,
                        repr(time.time()),
                        total_steps,
                        self.max_queue_length,
                        self.result_ttl_s,
                        "1" if idempotency_key else "0",
                        idempotency_key or "",
                        tenant,
                        callback_url,
                        self.keys.webhook_pending,
                    ],  # fmt: skip
                )
            )
        except ResponseError as exc:
            if str(exc).startswith("QUEUE_FULL"):
                waiting = str(exc).split()[-1]
                raise ResourceExhausted(
                    f"the job queue is full ({waiting} jobs waiting or running, the limit is "
                    f"jobs.max_queue_length = {self.max_queue_length}); retry later"
                ) from None
            raise
        return job.decode(), bool(created)

    async def get(self, job_id: str, *, with_result: bool = True) -> JobRecord:
        """The job's record (and result once SUCCEEDED). Raises NotFound."""
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.hgetall(self.keys.job(job_id))
            if with_result:
                pipe.get(self.keys.result(job_id))
            fields, *result = await self._call(pipe.execute())
        if not fields:
            raise NotFound(f"job_id: no job {job_id!r} (unknown, or its result expired)")
        return JobRecord.from_hash(job_id, fields, result[0] if result else None)

    async def cancel(self, job_id: str) -> JobRecord:
        """Cancels a job: a QUEUED job ends CANCELLED at once; a RUNNING one when its worker
        sees the request, at its next denoising step. An ended job is left as it is."""
        state = await self._call(
            self._scripts["cancel"](
                keys=[self.keys.job(job_id), self.keys.events(job_id)],
                args=[GROUP, repr(time.time()), self.result_ttl_s],
            )
        )
        if state is None:
            raise NotFound(f"job_id: no job {job_id!r} (unknown, or its result expired)")
        return await self.get(job_id)

    async def tenant_jobs(self, tenant: str, limit: int = 100) -> list[JobRecord]:
        """The tenant's newest `limit` jobs, newest first, without results (expired ones are
        skipped, and dropped from its list)."""
        index = self.keys.tenant_jobs(tenant)
        ids = [i.decode() for i in await self._call(self.redis.zrevrange(index, 0, limit - 1))]
        async with self.redis.pipeline(transaction=False) as pipe:
            for job_id in ids:
                pipe.hgetall(self.keys.job(job_id))
            hashes = await self._call(pipe.execute())
        if gone := [job_id for job_id, h in zip(ids, hashes, strict=True) if not h]:
            await self._call(self.redis.zrem(index, *gone))
        return [JobRecord.from_hash(i, h, None) for i, h in zip(ids, hashes, strict=True) if h]

    async def watch(self, job_id: str, *, poll_s: float = 1.0) -> AsyncIterator[JobRecord]:
        """Yields the job's record now, then after every change, until it has ended.

        The result is attached to the last record only.
        """
        events = self.keys.events(job_id)
        last = await self._call(self.redis.xrevrange(events, count=1))
        last_id = last[0][0] if last else b"0-0"
        record = await self.get(job_id, with_result=False)
        while True:
            if record.state.ended:
                yield await self.get(job_id)
                return
            yield record
            seen = record
            while record == seen:
                # Blocks until the job changes; the timeout re-reads in case the events
                # stream was trimmed or expired under us.
                got = await self._call(
                    self.redis.xread({events: last_id}, block=int(poll_s * 1000), count=100)
                )
                if got:
                    last_id = got[0][1][-1][0]
                record = await self.get(job_id, with_result=False)

    async def wait_for_cancel(self, job_id: str, *, poll_s: float = 5.0) -> None:
        """Returns once CancelJob was called for the job. It blocks on the job's events stream,
        which CancelJob writes to, so a running job hears of it at once."""
        events = self.keys.events(job_id)
        newest = await self._call(self.redis.xrevrange(events, count=1))
        last_id = newest[0][0] if newest else b"0-0"
        while True:  # read the flag after noting the newest event: no cancel falls between
            flag = await self._call(self.redis.hget(self.keys.job(job_id), "cancel_requested"))
            if flag == b"1":
                return
            got = await self._call(
                self.redis.xread({events: last_id}, block=int(poll_s * 1000), count=100)
            )
            if got:
                last_id = got[0][1][-1][0]

    async def queue_lengths(self) -> dict[str, int]:
        """Jobs waiting or running, per priority."""
        async with self.redis.pipeline(transaction=False) as pipe:
            for stream in self.streams:
                pipe.xlen(stream)
            lengths = await self._call(pipe.execute())
        return dict(zip(PRIORITIES, lengths, strict=True))

    # --- the worker side ----------------------------------------------------------------------

    async def claim(self, consumer: str, *, block_ms: int = 1000) -> list[Delivery]:
        """Takes work for `consumer`, highest priority first: an entry whose lease expired
        (XAUTOCLAIM), else a new entry (XREADGROUP). Blocks up to `block_ms` when there is
        none. Usually returns one delivery; a blocking read can return one per stream."""
        if not self._groups_ready:
            await self.ensure_groups()
        lease_ms = int(self.lease_s * 1000)
        for stream in self.streams:
            cursor = "0-0"
            for _ in range(100):  # bounded walk over the pending list
                cursor, claimed, *_ = await self._call(
                    self.redis.xautoclaim(stream, GROUP, consumer, lease_ms, cursor, count=1)
                )
                if claimed:
                    return [self._delivery(stream, entry) for entry in claimed]
                if cursor in (b"0-0", "0-0"):
                    break
        for stream in self.streams:
            got = await self._call(self.redis.xreadgroup(GROUP, consumer, {stream: ">"}, count=1))
            if got:
                return [self._delivery(stream, got[0][1][0])]
        got = await self._call(
            self.redis.xreadgroup(
                GROUP, consumer, dict.fromkeys(self.streams, ">"), count=1, block=block_ms
            )
        )
        deliveries = [self._delivery(s.decode(), e) for s, entries in got or [] for e in entries]
        rank = {s: i for i, s in enumerate(self.streams)}
        return sorted(deliveries, key=lambda d: rank[d.stream])

    @staticmethod
    def _delivery(stream, entry) -> Delivery:
        entry_id, fields = entry
        stream = stream.decode() if isinstance(stream, bytes) else stream
        return Delivery(stream, entry_id.decode(), fields[b"job"].decode())

    async def start(self, delivery: Delivery, consumer: str) -> Started:
        """Begins an attempt at a delivered job, or settles it without running (it ended, was
        cancelled, or used up its attempts: then it is FAILED)."""
        reply = await self._call(
            self._scripts["start"](
                keys=[
                    self.keys.job(delivery.job_id),
                    self.keys.events(delivery.job_id),
                    delivery.stream,
                ],
                args=[
                    GROUP,
                    consumer,
                    delivery.entry_id,
                    repr(time.time()),
                    self.max_attempts,
                    self.result_ttl_s,
                ],
            )  # fmt: skip
        )
        token, reason = int(reply[0]), reply[1].decode()
        if token == 0:
            return Started(0, reason=reason)
        return Started(token, request=reply[2], total_steps=int(reply[3]), reason=reason)

    async def renew(self, delivery: Delivery, consumer: str, token: int) -> Lease:
        """Renews the lease of attempt `token`, and says whether it still holds the job."""
        return Lease(
            await self._call(
                self._scripts["renew"](
                    keys=[self.keys.job(delivery.job_id), delivery.stream],
                    args=[GROUP, consumer, delivery.entry_id, token],
                )
            )
        )

    async def progress(self, delivery: Delivery, token: int, step: int, total: int) -> Lease:
        """Records step k/N of attempt `token`; answers like `renew`."""
        return Lease(
            await self._call(
                self._scripts["progress"](
                    keys=[self.keys.job(delivery.job_id), self.keys.events(delivery.job_id)],
                    args=[token, step, total],
                )
            )
        )

    async def end(
        self,
        delivery: Delivery,
        token: int,
        outcome: Outcome,
        *,
        error: str = "",
        result: bytes = b"",
    ) -> JobState | None:
        """Ends the attempt: stores the result (SUCCEEDED) and acknowledges the entry in one
        step. Outcome.RETRY puts the job back (after its lease) unless this was the last
        attempt. Returns the job's new state (QUEUED after a retry), or None when the attempt
        had lost the job (nothing was written)."""
        job_id = delivery.job_id
        state = await self._call(
            self._scripts["end"](
                keys=[
                    self.keys.job(job_id),
                    self.keys.events(job_id),
                    delivery.stream,
                    self.keys.result(job_id),
                ],
                args=[
                    GROUP,
                    delivery.entry_id,
                    token,
                    Outcome(outcome).value,
                    repr(time.time()),
                    self.result_ttl_s,
                    error,
                    result,
                    self.max_attempts,
                ],
            )  # fmt: skip
        )
        return JobState(state.decode()) if state else None


async def wait_for(queue: JobQueue, job_id: str, timeout_s: float) -> JobRecord:
    """Polls until the job has ended (for tests and scripts)."""
    deadline = time.monotonic() + timeout_s
    while True:
        record = await queue.get(job_id)
        if record.state.ended:
            return record
        if time.monotonic() > deadline:
            raise TimeoutError(f"job {job_id} still {record.state.value} after {timeout_s}s")
        await asyncio.sleep(0.05)
