"""Webhook deliveries kept in Redis, so that a restart loses none (issue 31, item 2).

The keys, each under `prefix` ("sdserve:" by default, as the job queue's in `keys.py`):

    {prefix}webhook:event:ID     a hash: job_id, url, body, secret_ref, state (pending, sending,
                                 delivered or dead), created, first_attempt, attempts, claims.
    {prefix}webhook:attempts:ID  a list of JSON attempts {"at", "status", "error"}, oldest first.
    {prefix}webhook:due          a sorted set: event id -> when its next attempt is due (unix s).
    {prefix}webhook:dead         a sorted set: undeliverable event id -> when it was given up.
    {prefix}webhook:job:JOB      the set of the job's event ids (for `attempts(job_id)`).

An event is enqueued once per event id (a job worker that retries its end sends nothing twice).
`due` claims due events for `lease_s` (one Lua script, so several workers never take the same
one); `record_attempt` records the attempt and delivers, reschedules or gives up (another
script). Delivery is at-least-once: an event is sent again only when its worker died, or its
lease ran out, before the attempt was recorded. A delivered event and its attempts expire after
`keep_s` (and re-enqueuing it after that would send it again); a dead one never expires, so
that it can be inspected (`dead()`, `attempts(job_id)`).

The scripts build some keys from the prefix instead of taking them as KEYS: one Redis, not a
Redis Cluster.
"""

from __future__ import annotations

import json
import logging
import random
import time
from dataclasses import dataclass
from importlib import resources

from sdserve.jobs import connection

logger = logging.getLogger(__name__)

__all__ = ["Attempt", "Backoff", "WebhookDelivery", "WebhookOutbox", "event_id_for"]


def _script(name: str) -> str:
    return (resources.files("sdserve.jobs") / "lua" / f"webhook_{name}.lua").read_text()


@dataclass(frozen=True)
class Backoff:
    """When a failed delivery is tried again: after `base_s`, then twice as long each time, at
    most `cap_s` apart, until `retry_for_s` after the first attempt. With `jitter`, each delay
    is drawn uniformly from [0, delay) ("full jitter"), from a generator seeded with `seed`.
    (lua/webhook_record.lua computes the delay.)"""

    base_s: float = 5.0
    cap_s: float = 3600.0
    retry_for_s: float = 24 * 3600.0
    jitter: bool = False
    seed: int | None = None

    def __post_init__(self):
        if not (0 < self.base_s <= self.cap_s) or self.retry_for_s < 0:
            raise ValueError(f"need 0 < base_s <= cap_s and retry_for_s >= 0, got {self}")


@dataclass(frozen=True)
class WebhookDelivery:
    """A claimed event, to be sent now: `claim` is the fencing token for `record_attempt`."""

    event_id: str
    job_id: str
    url: str
    body: bytes
    secret_ref: str
    attempts: int
    """Attempts recorded before this one."""
    claim: int


@dataclass(frozen=True)
class Attempt:
    """One delivery attempt: when, the HTTP status (None when no reply came), and why it
    failed ("" for a 2xx)."""

    event_id: str
    at: float
    status: int | None
    error: str


def event_id_for(job_id: str, body: bytes) -> str:
    """The id of a job's event: the job id and the event's type ("job.succeeded"), so each
    terminal event of a job is delivered once however often it is enqueued."""
    try:
        kind = json.loads(body).get("type") or "event"
    except (ValueError, AttributeError):
        kind = "event"
    return f"{job_id}:{kind}"


class WebhookOutbox:
    """The webhook deliveries of one sdserve deployment, in the Redis at `url`.

    `now` arguments are unix seconds (time.time() when left out), so tests can drive time.
    Every method raises `Unavailable` when Redis cannot be reached.
    """

    def __init__(
        self,
        url: str,
        *,
        key_prefix: str = "sdserve:",
        backoff: Backoff | None = None,
        lease_s: float = 60.0,
        keep_s: int = 7 * 24 * 3600,
        max_connections: int = 16,
    ):
        self.url = url
        self.prefix = f"{key_prefix}webhook:"
        self.backoff = backoff or Backoff()
        self.lease_s = lease_s
        self.keep_s = int(keep_s)
        self.redis = connection.connect(url, max_connections)
        self._rng = random.Random(self.backoff.seed)
        self._scripts = {
            name: self.redis.register_script(_script(name))
            for name in ("enqueue", "claim", "record")
        }

    def _key(self, kind: str, name: str | None = None) -> str:
        return f"{self.prefix}{kind}" if name is None else f"{self.prefix}{kind}:{name}"

    async def _call(self, coro):
        return await connection.call(self.url, coro)

    async def enqueue(
        self,
        job_id: str,
        url: str,
        body: bytes,
        secret_ref: str = "",
        *,
        event_id: str | None = None,
        now: float | None = None,
    ) -> str:
        """Stores the event `body` for `url`, due now, unless its id (`event_id_for` by
        default) is already stored. `secret_ref` names the secret that signs it (what
        `deliver_due`'s `secret_for` is given). Returns the event id."""
        event_id = event_id or event_id_for(job_id, body)
        keys = [self._key("event", event_id), self._key("due"), self._key("job", job_id)]
        now = time.time() if now is None else now
        stored = await self._call(
            self._scripts["enqueue"](keys, [event_id, job_id, url, body, secret_ref, repr(now)])
        )
        if not stored:
            logger.info("webhook event %s is already enqueued; not enqueued again", event_id)
        return event_id

    async def due(self, now: float | None = None, limit: int = 32) -> list[WebhookDelivery]:
        """Claims up to `limit` events whose next attempt is due, each for `lease_s`: no other
        caller gets them meanwhile, and they come due again if their attempt is not recorded
        within it."""
        now = time.time() if now is None else now
        args = [repr(now), int(limit), repr(self.lease_s), self._key("event", "")]
        flat = await self._call(self._scripts["claim"]([self._key("due")], args))
        out = []
        for i in range(0, len(flat), 7):
            event_id, claim, job_id, url, body, secret_ref, attempts = flat[i : i + 7]
            out.append(
                WebhookDelivery(
                    event_id=event_id.decode(),
                    job_id=job_id.decode(),
                    url=url.decode(),
                    body=bytes(body),
                    secret_ref=secret_ref.decode(),
                    attempts=int(attempts),
                    claim=int(claim),
                )
            )
        return out

    async def record_attempt(
        self,
        event_id: str,
        status_code: int | None,
        error: str = "",
        now: float | None = None,
        *,
        claim: int | None = None,
    ) -> str:
        """Records an attempt to deliver `event_id`: a 2xx `status_code` delivers it; anything
        else (None: no reply) reschedules it by `backoff`, or gives it up (dead) once the next
        attempt would fall past `retry_for_s` after its first. `claim` (from `due`) fences off
        an attempt whose lease ran out: its failure then decides nothing (None: no fencing).
        Returns "delivered",
        "retry", "dead", "stale" or "gone" (no such event)."""
        now = time.time() if now is None else now
        keys = [
            self._key("event", event_id),
            self._key("attempts", event_id),
            self._key("due"),
            self._key("dead"),
        ]
        b = self.backoff
        u = self._rng.random() if b.jitter else 1.0
        status = "" if status_code is None else int(status_code)
        args = [event_id, "" if claim is None else claim, repr(now), status, error,
                repr(b.base_s), repr(b.cap_s), repr(b.retry_for_s), repr(u), self.keep_s,
                self._key("job", "")]  # fmt: skip
        outcome = (await self._call(self._scripts["record"](keys, args))).decode()
        if outcome == "dead":
            logger.warning("webhook event %s is undeliverable after %s s", event_id, b.retry_for_s)
        return outcome

    async def state(self, event_id: str) -> str | None:
        """The event's state: "pending", "sending", "delivered" or "dead"; None for an unknown
        (or expired) event."""
        state = await self._call(self.redis.hget(self._key("event", event_id), "state"))
        return state.decode() if state else None

    async def attempts(self, job_id: str) -> list[Attempt]:
        """Every recorded attempt to deliver the job's events, oldest first."""
        event_ids = sorted(
            e.decode() for e in await self._call(self.redis.smembers(self._key("job", job_id)))
        )
        out = []
        for event_id in event_ids:
            rows = await self._call(self.redis.lrange(self._key("attempts", event_id), 0, -1))
            for row in rows:
                a = json.loads(row)
                status = int(a["status"]) if a["status"] else None
                out.append(Attempt(event_id, float(a["at"]), status, a["error"]))
        return sorted(out, key=lambda a: a.at)

    async def dead(self, limit: int = 100) -> list[str]:
        """The ids of undeliverable events, the most recently given up first."""
        ids = await self._call(self.redis.zrevrange(self._key("dead"), 0, limit - 1))
        return [i.decode() for i in ids]

    async def close(self) -> None:
        await self.redis.aclose()
