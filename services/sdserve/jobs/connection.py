"""Connecting to the job queue's Redis, and what "Redis is down" looks like to callers."""

from __future__ import annotations

import asyncio
from urllib.parse import urlsplit, urlunsplit

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import AuthenticationError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from sdserve.errors import Unavailable

REDIS_DOWN_ERRORS = (RedisConnectionError, RedisTimeoutError, OSError)
"""What redis-py raises when the server cannot be reached (OSError: DNS, refused sockets)."""


def connect(url: str, max_connections: int = 64, wait_s: float = 2.0) -> aioredis.Redis:
    """A client for `url` (connects on first use). A few quick retries hide a dropped
    connection (Redis restarted); a Redis that stays down surfaces in well under a second.

    Its pool opens at most `max_connections`: every watcher and running job holds one in a
    blocking read, and without a bound a burst of them opens connections until Redis's
    `maxclients` refuses everyone's. A call that finds them all in use waits up to `wait_s`
    for one, then fails (`call` makes it Unavailable)."""
    pool = aioredis.BlockingConnectionPool.from_url(
        url,
        max_connections=max_connections,
        timeout=wait_s,
        socket_connect_timeout=2.0,
        socket_timeout=15.0,
        health_check_interval=15,
        retry=Retry(ExponentialBackoff(cap=0.5, base=0.05), retries=3),
        retry_on_error=[RedisConnectionError, RedisTimeoutError],
    )
    return aioredis.Redis(connection_pool=pool)


def pool_exhausted(exc: BaseException) -> bool:
    """Whether `exc` is the bounded pool's "no connection was free within its timeout"
    (redis-py raises it as a ConnectionError caused by the wait's TimeoutError)."""
    return isinstance(exc, RedisConnectionError) and isinstance(exc.__cause__, asyncio.TimeoutError)


def redact(url: str) -> str:
    """The URL without its password, for messages and logs."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.rsplit("@", 1)[1]
    user = parts.username or ""
    return urlunsplit(parts._replace(netloc=f"{user}:***@{netloc}"))


async def call(url: str, coro):
    """Awaits a Redis call on the server at `url`, turning "Redis is down" (or refuses our
    password) into Unavailable, with a message that says what to do."""
    try:
        return await coro
    except AuthenticationError as exc:
        raise Unavailable(
            f"the job queue's Redis at {redact(url)} refused sdserve's credentials ({exc}); "
            "check the password in --redis-url / jobs.redis_url"
        ) from exc
    except REDIS_DOWN_ERRORS as exc:
        if pool_exhausted(exc):
            raise Unavailable(
                "every connection to the job queue's Redis is in use (jobs.max_connections, "
                "held by watchers and running jobs); retry shortly"
            ) from exc
        raise Unavailable(
            f"the job queue's Redis at {redact(url)} does not answer ({exc}). Start one "
            "(`redis-server`, or `make redis`), or point sdserve at yours with --redis-url / "
            "jobs.redis_url"
        ) from exc
