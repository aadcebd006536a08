"""The job queue on Redis: at-least-once delivery that never loses an accepted job.

Data model (every key starts with `key_prefix`, "sdserve:" by default):

    queue:{high,normal,low}  a Redis Stream per priority; one entry per job, read by the consumer
                             group "workers" (XREADGROUP). An entry is acknowledged (XACK) and
                             deleted only once its job has ended, in the same script that stores
                             the result, so XLEN over the three streams is the number of jobs
                             waiting or running.
    job:ID                   a hash: state, priority, request, attempts, step/total_steps, error,
                             timestamps, the worker running it. It expires `result_ttl_s` after
                             the job ended; a job that has not ended never expires.
    result:ID                the serialized result, with the same TTL.
    events:ID                a short stream of state changes and steps (WatchJob reads it).
    idem:KEY                 idempotency key -> job id; it expires with the job.

A worker owns a job while the job's stream entry is in its pending list. It renews that lease
(XCLAIM ... JUSTID, which resets the entry's idle time) every `lease_s / 3` while the job runs;
an entry idle for longer than `lease_s` belongs to a dead worker and is reclaimed with XAUTOCLAIM.
Each start increments `attempts`, and that number is the fencing token of the attempt: progress,
renewals and the final write of an attempt that lost its job to another worker change nothing.
After `max_attempts` starts without an end, the job is FAILED (the dead letter).

Every state change is one Lua script, so it is atomic on the server. Request and result are
opaque bytes here (serialized protobuf messages, written and read at the edges).
"""

from __future__ import annotations

import asyncio
import enum
import logging
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from urllib.parse import urlsplit, urlunsplit

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import AuthenticationError, ResponseError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from sdserve.errors import NotFound, ResourceExhausted, Unavailable

logger = logging.getLogger(__name__)

PRIORITIES = ("high", "normal", "low")
"""Priority levels, highest first. Workers always take the highest waiting one."""

GROUP = "workers"
REDIS_DOWN_ERRORS = (RedisConnectionError, RedisTimeoutError, OSError)
"""What redis-py raises when the server cannot be reached (OSError: DNS, refused sockets)."""


class JobState(str, enum.Enum):
    QUEUED = "QUEUED"
    RUNNING = "RUNNING"
    SUCCEEDED = "SUCCEEDED"
    FAILED = "FAILED"
    CANCELLED = "CANCELLED"

    @property
    def ended(self) -> bool:
        return self in (JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED)


@dataclass(frozen=True)
class JobRecord:
    """What Redis holds about one job."""

    job_id: str
    state: JobState
    priority: str
    attempts: int
    step: int
    total_steps: int
    error: str
    created_at: float
    started_at: float | None
    finished_at: float | None
    cancel_requested: bool
    worker: str
    request: bytes
    result: bytes | None = None

    @classmethod
    def from_hash(cls, job_id: str, h: dict[bytes, bytes], result: bytes | None) -> JobRecord:
        def text(name: str) -> str:
            return h.get(name.encode(), b"").decode()

        def moment(name: str) -> float | None:
            value = text(name)
            return float(value) if value else None

        return cls(
            job_id=job_id,
            state=JobState(text("state")),
            priority=text("priority"),
            attempts=int(text("attempts") or 0),
            step=int(text("step") or 0),
            total_steps=int(text("total_steps") or 0),
            error=text("error"),
            created_at=float(text("created_at") or 0),
            started_at=moment("started_at"),
            finished_at=moment("finished_at"),
            cancel_requested=text("cancel_requested") == "1",
            worker=text("worker"),
            request=h.get(b"request", b""),
            result=result,
        )


@dataclass(frozen=True)
class Delivery:
    """A stream entry handed to a worker: it owns the job until it ends or its lease expires."""

    stream: str
    entry_id: str
    job_id: str


@dataclass(frozen=True)
class Started:
    """The outcome of `JobQueue.start`: `token` > 0 means "run it" (the attempt number)."""

    token: int
    request: bytes = b""
    total_steps: int = 0
    reason: str = ""


def redact(url: str) -> str:
    """The URL without its password, for messages and logs."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.rsplit("@", 1)[1]
    user = parts.username or ""
    return urlunsplit(parts._replace(netloc=f"{user}:***@{netloc}"))


# --- Lua scripts: one per state change, atomic on the server -------------------------------
# Helpers the scripts below share. finish(): a job ended (END, START's dead letter, CANCEL):
# acknowledge and delete its stream entry, and start the TTLs.
_LUA_HELPERS = """
local function finish(job, events, stream, group, entry, ttl)
  redis.call('XACK', stream, group, entry)
  redis.call('XDEL', stream, entry)
  local idem = redis.call('HGET', job, 'idem')
  if idem then redis.call('EXPIRE', idem, ttl) end
  redis.call('EXPIRE', job, ttl)
  redis.call('EXPIRE', events, ttl)
end
local function event(events, state, step)
  redis.call('XADD', events, 'MAXLEN', '~', 64, '*', 'state', state, 'step', step)
end
local function ended(state)
  return state == 'SUCCEEDED' or state == 'FAILED' or state == 'CANCELLED'
end
"""

# KEYS: job, events, stream, idem, queue streams...  ARGV: job_id, request, priority, now,
# total_steps, max_queue_length, ttl, has_idem, idem_key
_SUBMIT = """
if ARGV[8] == '1' then
  local existing = redis.call('GET', KEYS[4])
  if existing then return {existing, 0} end
end
local waiting = 0
for i = 5, #KEYS do waiting = waiting + redis.call('XLEN', KEYS[i]) end
if waiting >= tonumber(ARGV[6]) then return redis.error_reply('QUEUE_FULL ' .. waiting) end
local entry = redis.call('XADD', KEYS[3], '*', 'job', ARGV[1])
redis.call('HSET', KEYS[1], 'state', 'QUEUED', 'priority', ARGV[3], 'request', ARGV[2],
  'created_at', ARGV[4], 'attempts', 0, 'step', 0, 'total_steps', ARGV[5],
  'stream', KEYS[3], 'entry', entry, 'cancel_requested', 0)
if ARGV[8] == '1' then
  redis.call('SET', KEYS[4], ARGV[1])  -- expires with the job, once it has ended
  redis.call('HSET', KEYS[1], 'idempotency_key', ARGV[9], 'idem', KEYS[4])
end
redis.call('XADD', KEYS[2], 'MAXLEN', '~', 64, '*', 'state', 'QUEUED', 'step', 0)
return {ARGV[1], 1}
"""

# KEYS: job, events, stream  ARGV: group, consumer, entry, now, max_attempts, ttl
_START = (
    _LUA_HELPERS
    + """
if #redis.call('XPENDING', KEYS[3], ARGV[1], ARGV[3], ARGV[3], 1, ARGV[2]) == 0 then
  return {0, 'not ours'}  -- reclaimed by another worker since we read it
end
if redis.call('EXISTS', KEYS[1]) == 0 then
  finish(KEYS[1], KEYS[2], KEYS[3], ARGV[1], ARGV[3], ARGV[6])
  return {0, 'expired'}
end
local state = redis.call('HGET', KEYS[1], 'state')
if ended(state) then
  finish(KEYS[1], KEYS[2], KEYS[3], ARGV[1], ARGV[3], ARGV[6])
  return {0, state}
end
if redis.call('HGET', KEYS[1], 'cancel_requested') == '1' then
  redis.call('HSET', KEYS[1], 'state', 'CANCELLED', 'finished_at', ARGV[4])
  finish(KEYS[1], KEYS[2], KEYS[3], ARGV[1], ARGV[3], ARGV[6])
  event(KEYS[2], 'CANCELLED', 0)
  return {0, 'CANCELLED'}
end
local attempts = tonumber(redis.call('HGET', KEYS[1], 'attempts'))
if attempts >= tonumber(ARGV[5]) then
  local last = redis.call('HGET', KEYS[1], 'error')
  local why = 'gave up after ' .. attempts .. ' attempts'
  if last and last ~= '' then why = why .. '; last: ' .. last
  else why = why .. ': each ended without a result (its worker died or lost its lease)' end
  redis.call('HSET', KEYS[1], 'state', 'FAILED', 'error', why, 'finished_at', ARGV[4])
  finish(KEYS[1], KEYS[2], KEYS[3], ARGV[1], ARGV[3], ARGV[6])
  event(KEYS[2], 'FAILED', 0)
  return {0, 'FAILED'}
end
attempts = attempts + 1
redis.call('HSET', KEYS[1], 'state', 'RUNNING', 'attempts', attempts, 'started_at', ARGV[4],
  'worker', ARGV[2], 'step', 0)
event(KEYS[2], 'RUNNING', 0)
return {attempts, 'RUNNING', redis.call('HGET', KEYS[1], 'request'),
  redis.call('HGET', KEYS[1], 'total_steps')}
"""
)

# Renews the lease of a running attempt and reports a cancel request.
# KEYS: job, stream  ARGV: group, consumer, entry, token
# Returns -1 when the attempt lost its job, else 1 if cancel was requested, else 0.
_RENEW = """
if redis.call('HGET', KEYS[1], 'attempts') ~= ARGV[4]
    or redis.call('HGET', KEYS[1], 'state') ~= 'RUNNING' then
  return -1
end
redis.call('XCLAIM', KEYS[2], ARGV[1], ARGV[2], 0, ARGV[3], 'JUSTID')
return tonumber(redis.call('HGET', KEYS[1], 'cancel_requested'))
"""

# KEYS: job, events  ARGV: token, step, total. Returns like _RENEW.
_PROGRESS = (
    _LUA_HELPERS
    + """
if redis.call('HGET', KEYS[1], 'attempts') ~= ARGV[1]
    or redis.call('HGET', KEYS[1], 'state') ~= 'RUNNING' then
  return -1
end
redis.call('HSET', KEYS[1], 'step', ARGV[2], 'total_steps', ARGV[3])
event(KEYS[2], 'RUNNING', ARGV[2])
return tonumber(redis.call('HGET', KEYS[1], 'cancel_requested'))
"""
)

# Ends an attempt. outcome: SUCCEEDED | FAILED | CANCELLED | RETRY (a failure worth another
# attempt: the entry stays pending, so XAUTOCLAIM hands it out again after the lease).
# KEYS: job, events, stream, result  ARGV: group, entry, token, outcome, now, ttl, error,
# result, max_attempts.  Returns the job's new state, or false when the attempt no longer owned
# the job (nothing written).
_END = (
    _LUA_HELPERS
    + """
local state = redis.call('HGET', KEYS[1], 'state')
if redis.call('HGET', KEYS[1], 'attempts') ~= ARGV[3] or state ~= 'RUNNING' then
  return false
end
local outcome = ARGV[4]
if outcome == 'RETRY' then
  if tonumber(ARGV[3]) < tonumber(ARGV[9]) then
    redis.call('HSET', KEYS[1], 'state', 'QUEUED', 'error', ARGV[7], 'step', 0)
    event(KEYS[2], 'QUEUED', 0)
    return 'QUEUED'
  end
  outcome = 'FAILED'
end
if outcome == 'SUCCEEDED' then
  redis.call('SET', KEYS[4], ARGV[8], 'EX', ARGV[6])
end
redis.call('HSET', KEYS[1], 'state', outcome, 'error', ARGV[7], 'finished_at', ARGV[5])
finish(KEYS[1], KEYS[2], KEYS[3], ARGV[1], ARGV[2], ARGV[6])
event(KEYS[2], outcome, redis.call('HGET', KEYS[1], 'step'))
return outcome
"""
)

# KEYS: job, events  ARGV: group, now, ttl.  Returns the state after the call, or nil.
_CANCEL = (
    _LUA_HELPERS
    + """
local state = redis.call('HGET', KEYS[1], 'state')
if not state or ended(state) then return state end
redis.call('HSET', KEYS[1], 'cancel_requested', 1)
if state == 'QUEUED' then
  local stream = redis.call('HGET', KEYS[1], 'stream')
  redis.call('HSET', KEYS[1], 'state', 'CANCELLED', 'finished_at', ARGV[2])
  finish(KEYS[1], KEYS[2], stream, ARGV[1], redis.call('HGET', KEYS[1], 'entry'), ARGV[3])
  event(KEYS[2], 'CANCELLED', 0)
  return 'CANCELLED'
end
event(KEYS[2], state, redis.call('HGET', KEYS[1], 'step'))
return state
"""
)


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
    ):
        self.url = url
        self.prefix = key_prefix
        self.result_ttl_s = result_ttl_s
        self.max_queue_length = max_queue_length
        self.max_attempts = max_attempts
        self.lease_s = lease_s
        # A few quick retries hide a dropped connection (Redis restarted); a Redis that stays
        # down surfaces in well under a second as Unavailable.
        self.redis = aioredis.Redis.from_url(
            url,
            socket_connect_timeout=2.0,
            socket_timeout=15.0,
            health_check_interval=15,
            retry=Retry(ExponentialBackoff(cap=0.5, base=0.05), retries=3),
            retry_on_error=[RedisConnectionError, RedisTimeoutError],
        )
        self.streams = [self.key("queue", p) for p in PRIORITIES]
        self._scripts = {
            name: self.redis.register_script(source)
            for name, source in {
                "submit": _SUBMIT,
                "start": _START,
                "renew": _RENEW,
                "progress": _PROGRESS,
                "end": _END,
                "cancel": _CANCEL,
            }.items()
        }
        self._groups_ready = False

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
        )

    def key(self, kind: str, name: str) -> str:
        return f"{self.prefix}{kind}:{name}"

    async def close(self) -> None:
        await self.redis.aclose()

    async def _call(self, coro):
        """Awaits a Redis call, turning "Redis is down" into Unavailable."""
        try:
            return await coro
        except AuthenticationError as exc:
            raise Unavailable(
                f"the job queue's Redis at {redact(self.url)} refused sdserve's credentials "
                f"({exc}); check the password in --redis-url / jobs.redis_url"
            ) from exc
        except REDIS_DOWN_ERRORS as exc:
            raise Unavailable(
                f"the job queue's Redis at {redact(self.url)} does not answer ({exc}). Start "
                "one (`redis-server`, or `make redis`), or point sdserve at yours with "
                "--redis-url / jobs.redis_url"
            ) from exc

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
    ) -> tuple[str, bool]:
        """Enqueues a job. Returns (job id, created); created is False when `idempotency_key`
        named an existing job, whose id is returned.

        Raises:
            ResourceExhausted: `max_queue_length` jobs are waiting or running.
            Unavailable: Redis does not answer; no job was created.
        """
        if priority not in PRIORITIES:
            raise ValueError(f"unknown priority {priority!r}")
        if not self._groups_ready:
            await self.ensure_groups()
        job_id = uuid.uuid4().hex
        stream = self.key("queue", priority)
        try:
            job, created = await self._call(
                self._scripts["submit"](
                    keys=[
                        self.key("job", job_id),
                        self.key("events", job_id),
                        stream,
                        self.key("idem", idempotency_key or ""),
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
            pipe.hgetall(self.key("job", job_id))
            if with_result:
                pipe.get(self.key("result", job_id))
            fields, *result = await self._call(pipe.execute())
        if not fields:
            raise NotFound(f"job_id: no job {job_id!r} (unknown, or its result expired)")
        return JobRecord.from_hash(job_id, fields, result[0] if result else None)

    async def cancel(self, job_id: str) -> JobRecord:
        """Cancels a job: a QUEUED job ends CANCELLED at once; a RUNNING one when its worker
        sees the request, at its next denoising step. An ended job is left as it is."""
        state = await self._call(
            self._scripts["cancel"](
                keys=[self.key("job", job_id), self.key("events", job_id)],
                args=[GROUP, repr(time.time()), self.result_ttl_s],
            )
        )
        if state is None:
            raise NotFound(f"job_id: no job {job_id!r} (unknown, or its result expired)")
        return await self.get(job_id)

    async def watch(self, job_id: str, *, poll_s: float = 1.0) -> AsyncIterator[JobRecord]:
        """Yields the job's record now, then after every change, until it has ended.

        The result is attached to the last record only.
        """
        events = self.key("events", job_id)
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
                    self.key("job", delivery.job_id),
                    self.key("events", delivery.job_id),
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

    async def renew(self, delivery: Delivery, consumer: str, token: int) -> int:
        """Renews the lease. Returns -1 if the attempt lost the job, 1 if cancel was requested."""
        return int(
            await self._call(
                self._scripts["renew"](
                    keys=[self.key("job", delivery.job_id), delivery.stream],
                    args=[GROUP, consumer, delivery.entry_id, token],
                )
            )
        )

    async def progress(self, delivery: Delivery, token: int, step: int, total: int) -> int:
        """Records step k/N. Returns like `renew`."""
        return int(
            await self._call(
                self._scripts["progress"](
                    keys=[self.key("job", delivery.job_id), self.key("events", delivery.job_id)],
                    args=[token, step, total],
                )
            )
        )

    async def end(
        self,
        delivery: Delivery,
        token: int,
        outcome: str,
        *,
        error: str = "",
        result: bytes = b"",
    ) -> str:
        """Ends the attempt: stores the result (SUCCEEDED) and acknowledges the entry in one
        step. outcome RETRY puts the job back (after its lease) unless this was the last
        attempt. Returns the job's new state (QUEUED after a retry), or "" when the attempt
        had lost the job (nothing was written)."""
        job_id = delivery.job_id
        state = await self._call(
            self._scripts["end"](
                keys=[
                    self.key("job", job_id),
                    self.key("events", job_id),
                    delivery.stream,
                    self.key("result", job_id),
                ],
                args=[
                    GROUP,
                    delivery.entry_id,
                    token,
                    outcome,
                    repr(time.time()),
                    self.result_ttl_s,
                    error,
                    result,
                    self.max_attempts,
                ],
            )  # fmt: skip
        )
        return state.decode() if state else ""


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
