"""Webhooks for jobs (issue 31, item 2), as a library: signing, the event, the allow-list, and
sending what `WebhookOutbox` (webhook_outbox.py) holds.

Signing follows the Standard Webhooks convention (https://www.standardwebhooks.com/): a secret
`whsec_<base64 key>`; every request carries `webhook-id` (the event id, the same on every
retry), `webhook-timestamp` (unix seconds of the attempt) and `webhook-signature`
(`v1,<base64 HMAC-SHA256 of "{id}.{timestamp}.{body}">`), so any Standard Webhooks verifier
(svix's `Webhook.verify`, for one) checks it.

Nothing here is wired to SubmitJob, the job worker or the CLI yet.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import logging
import secrets
import time
from collections.abc import Callable, Iterable
from datetime import UTC, datetime
from urllib.parse import urlsplit

import aiohttp

from sdserve.errors import InvalidArgument, PermissionDenied
from sdserve.jobs.records import JobState
from sdserve.jobs.webhook_outbox import Attempt, Backoff, WebhookDelivery, WebhookOutbox

logger = logging.getLogger(__name__)

__all__ = [
    "Attempt",
    "Backoff",
    "WebhookDelivery",
    "WebhookOutbox",
    "check_callback_url",
    "deliver_due",
    "job_event",
    "new_secret",
    "sign",
    "signed_headers",
]

SECRET_PREFIX = "whsec_"
EVENT_TYPES = {
    JobState.SUCCEEDED: "job.succeeded",
    JobState.FAILED: "job.failed",
    JobState.CANCELLED: "job.cancelled",
}
"""The event type of each terminal job state."""
DEFAULT_PORTS = {"http": 80, "https": 443}


# --- signing ----------------------------------------------------------------------------------


def new_secret() -> str:
    """A fresh signing secret, `whsec_` and 32 random bytes in base64."""
    return SECRET_PREFIX + base64.b64encode(secrets.token_bytes(32)).decode()


def _key(secret: str) -> bytes:
    if not secret.startswith(SECRET_PREFIX):
        raise ValueError("a webhook secret starts with whsec_ (then its key in base64)")
    try:
        return base64.b64decode(secret.removeprefix(SECRET_PREFIX), validate=True)
    except ValueError as exc:
        raise ValueError(f"a webhook secret's key after whsec_ is base64: {exc}") from exc


def sign(secret: str, event_id: str, timestamp: int, body: bytes) -> str:
    """The `webhook-signature` value: `v1,` and the base64 HMAC-SHA256, under the secret's
    key, of `{event_id}.{timestamp}.{body}`."""
    signed = f"{event_id}.{int(timestamp)}.".encode() + body
    digest = hmac.new(_key(secret), signed, hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode()


def signed_headers(
    secret: str, event_id: str, body: bytes, timestamp: float | None = None
) -> dict[str, str]:
    """The headers of one delivery attempt at `timestamp` (unix seconds; now by default)."""
    ts = int(time.time() if timestamp is None else timestamp)
    return {
        "content-type": "application/json",
        "webhook-id": event_id,
        "webhook-timestamp": str(ts),
        "webhook-signature": sign(secret, event_id, ts, body),
    }


# --- the event --------------------------------------------------------------------------------


def job_event(
    job_id: str,
    state: JobState | str,
    *,
    error: str = "",
    image_urls: list[str] | None = None,
    images_b64: list[str] | None = None,
    timestamp: datetime | None = None,
    **extra,
) -> bytes:
    """The JSON body announcing that job `job_id` ended in `state`:
    `{"type": "job.succeeded"|"job.failed"|"job.cancelled", "timestamp": ISO 8601 UTC,
    "data": {"job_id", "state", "error", "image_urls" or "images_b64", **extra}}`."""
    state = JobState(state)
    if state not in EVENT_TYPES:
        raise ValueError(f"only a job's end is announced, not {state.value}")
    data = {"job_id": job_id, "state": state.value, "error": error}
    if image_urls is not None:
        data["image_urls"] = list(image_urls)
    if images_b64 is not None:
        data["images_b64"] = list(images_b64)
    data.update(extra)
    when = (timestamp or datetime.now(UTC)).astimezone(UTC)
    event = {
        "type": EVENT_TYPES[state],
        "timestamp": when.isoformat().replace("+00:00", "Z"),
        "data": data,
    }
    return json.dumps(event, separators=(",", ":")).encode()


# --- the allow-list ---------------------------------------------------------------------------


def _allowed_entry(entry: str) -> tuple[str, int | None]:
    """`HOST` or `HOST:PORT` (`[v6]:PORT` for IPv6) as (lower-case host, port or None)."""
    parts = urlsplit("//" + entry.strip())
    if not parts.hostname or parts.username or parts.path:
        raise ValueError(f"a webhook allow-list entry is HOST or HOST:PORT, not {entry!r}")
    return parts.hostname.rstrip("."), parts.port  # .port raises ValueError for a bad port


def check_callback_url(url: str, allowed: Iterable[str]) -> None:
    """Refuses `url` unless it is an http(s) URL whose host (and port, where the entry names
    one) is on `allowed` (`HOST[:PORT]` entries; hosts compared exactly, in any case). An
    empty list refuses every URL. Raises InvalidArgument("callback_url", ...) for a malformed
    URL, PermissionDenied naming callback_url for a host off the list."""
    if not url or any(c.isspace() or ord(c) < 32 for c in url):
        raise InvalidArgument("callback_url", "must be a URL without spaces")
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme not in DEFAULT_PORTS:
        raise InvalidArgument("callback_url", f"must be an http:// or https:// URL, not {url!r}")
    try:
        host, port = parts.hostname, parts.port or DEFAULT_PORTS[scheme]
    except ValueError as exc:
        raise InvalidArgument("callback_url", f"has an invalid port: {exc}") from exc
    if not host:
        raise InvalidArgument("callback_url", f"names no host: {url!r}")
    if parts.username is not None or parts.password is not None:
        raise InvalidArgument("callback_url", "must not carry credentials")
    host = host.rstrip(".")
    for entry in allowed:
        allowed_host, allowed_port = _allowed_entry(entry)
        if allowed_host == host and allowed_port in (None, port):
            return
    raise PermissionDenied(
        f"callback_url: {host}:{port} is not on the webhook allow-list (sdserve serve "
        "--webhook-allow HOST[:PORT]); sdserve sends webhooks only to the hosts its operator "
        "allows"
    )


# --- delivery ---------------------------------------------------------------------------------


async def _post(
    session: aiohttp.ClientSession, delivery: WebhookDelivery, secret: str, now: float,
    timeout_s: float,
) -> tuple[int | None, str]:  # fmt: skip
    """One attempt: (the HTTP status, "" or why it failed). Redirects are not followed: they
    could lead off the allow-list."""
    headers = signed_headers(secret, delivery.event_id, delivery.body, now)
    try:
        async with session.post(
            delivery.url,
            data=delivery.body,
            headers=headers,
            timeout=aiohttp.ClientTimeout(total=timeout_s),
            allow_redirects=False,
        ) as response:
            if 200 <= response.status < 300:
                return response.status, ""
            return response.status, f"HTTP {response.status} {response.reason or ''}".strip()
    except (aiohttp.ClientError, TimeoutError, OSError) as exc:
        return None, f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


async def _deliver_one(outbox, session, secret_for, delivery, now, timeout_s) -> str:
    try:
        secret = secret_for(delivery.secret_ref)
        _key(secret)
    except (KeyError, ValueError) as exc:
        status, error = None, f"no usable secret {delivery.secret_ref!r}: {exc}"
    else:
        status, error = await _post(session, delivery, secret, now, timeout_s)
    outcome = await outbox.record_attempt(
        delivery.event_id, status, error, now, claim=delivery.claim
    )
    logger.info(
        "webhook %s to %s: attempt %d, %s -> %s",
        delivery.event_id, delivery.url, delivery.attempts + 1, status or error, outcome,
    )  # fmt: skip
    return outcome


async def deliver_due(
    outbox: WebhookOutbox,
    session: aiohttp.ClientSession,
    secret_for: Callable[[str], str],
    now: float | None = None,
    *,
    limit: int = 32,
    timeout_s: float = 10.0,
) -> dict[str, str]:
    """Claims the events due at `now` (at most `limit`), POSTs each, signed with
    `secret_for(its secret_ref)` and timestamped `now`, at most `timeout_s` each, concurrently,
    and records every attempt. Returns event id -> "delivered", "retry", "dead" or "stale"."""
    now = time.time() if now is None else now
    deliveries = await outbox.due(now, limit)
    outcomes = await asyncio.gather(
        *(_deliver_one(outbox, session, secret_for, d, now, timeout_s) for d in deliveries)
    )
    return {d.event_id: outcome for d, outcome in zip(deliveries, outcomes, strict=True)}
