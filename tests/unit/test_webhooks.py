"""The webhook library (jobs/webhooks.py, jobs/webhook_outbox.py) against a real redis-server
and a real HTTP receiver on 127.0.0.1; signatures checked by svix, a published Standard
Webhooks verifier. Time is driven by `now` arguments: nothing sleeps through a backoff."""

from __future__ import annotations

import asyncio
import contextlib
import json
import uuid
from datetime import UTC, datetime

import aiohttp
import pytest
from aiohttp import web
from helpers import free_port
from svix.webhooks import Webhook, WebhookVerificationError

from sdserve.errors import InvalidArgument, PermissionDenied
from sdserve.jobs.webhooks import (
    Backoff,
    WebhookOutbox,
    check_callback_url,
    deliver_due,
    job_event,
    new_secret,
    signed_headers,
)

pytestmark = pytest.mark.timeout(60)

SECRET = new_secret()
T0 = 2_000_000_000.0  # a fake clock for the backoff tests (2033)


class Receiver:
    """An HTTP server on 127.0.0.1 that records every POST and answers the next status of
    `statuses` (the last one from then on)."""

    def __init__(self, statuses=(200,), delay_s: float = 0.0):
        self.statuses = list(statuses)
        self.delay_s = delay_s
        self.got: list[tuple[dict, bytes]] = []
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/hook"

    async def _handle(self, request: web.Request) -> web.Response:
        self.got.append(({k.lower(): v for k, v in request.headers.items()}, await request.read()))
        status = self.statuses.pop(0) if len(self.statuses) > 1 else self.statuses[0]
        await asyncio.sleep(self.delay_s)
        if status in (301, 302, 307, 308):
            raise web.HTTPTemporaryRedirect("http://127.0.0.1:9/elsewhere")
        return web.Response(status=status, text="ok")

    @contextlib.asynccontextmanager
    async def running(self):
        app = web.Application()
        app.router.add_post("/hook", self._handle)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", self.port).start()
        try:
            yield self
        finally:
            await runner.cleanup()


def _outbox(redis_server, prefix: str, **backoff) -> WebhookOutbox:
    backoff = {"base_s": 10.0, "cap_s": 100.0, "retry_for_s": 1000.0, **backoff}
    return WebhookOutbox(redis_server.url, key_prefix=prefix, backoff=Backoff(**backoff),
                         lease_s=30.0)  # fmt: skip


def _prefix() -> str:
    return f"wh{uuid.uuid4().hex[:8]}:"


def _secret_for(ref: str) -> str:
    return {"main": SECRET}[ref]


async def _send(outbox, now=None, timeout_s=2.0) -> dict[str, str]:
    async with aiohttp.ClientSession() as session:
        return await deliver_due(outbox, session, _secret_for, now, timeout_s=timeout_s)


def test_signatures_verify_with_svix_and_a_changed_body_does_not():
    body = job_event("j1", "SUCCEEDED", image_urls=["http://sdserve/v1/jobs/j1/images/0"])
    headers = signed_headers(SECRET, "j1:job.succeeded", body)
    Webhook(SECRET).verify(body, headers)
    with pytest.raises(WebhookVerificationError):
        Webhook(SECRET).verify(body.replace(b"j1", b"j2"), headers)
    with pytest.raises(WebhookVerificationError):
        Webhook(new_secret()).verify(body, headers)


def test_the_event_names_the_job_its_end_and_its_images():
    when = datetime(2026, 12, 6, 7, 0, tzinfo=UTC)
    event = json.loads(job_event("j1", "FAILED", error="boom", timestamp=when, tenant="a"))
    assert event == {
        "type": "job.failed",
        "timestamp": "2026-12-06T07:00:00Z",
        "data": {"job_id": "j1", "state": "FAILED", "error": "boom", "tenant": "a"},
    }
    inline = json.loads(job_event("j2", "SUCCEEDED", images_b64=["aGk="]))
    assert inline["type"] == "job.succeeded" and inline["data"]["images_b64"] == ["aGk="]
    assert json.loads(job_event("j3", "CANCELLED"))["type"] == "job.cancelled"
    with pytest.raises(ValueError):
        job_event("j4", "RUNNING")


def test_a_delivered_request_verifies_with_svix_at_the_receiver(redis_server):
    async def main():
        outbox = _outbox(redis_server, _prefix())
        async with Receiver().running() as receiver:
            body = job_event("j1", "SUCCEEDED", image_urls=["http://x/0.png"])
            event_id = await outbox.enqueue("j1", receiver.url, body, "main")
            assert await _send(outbox) == {event_id: "delivered"}
        (headers, got), = receiver.got  # fmt: skip
        assert got == body and headers["webhook-id"] == event_id == "j1:job.succeeded"
        Webhook(SECRET).verify(got, headers)  # real time: within svix's 5-minute tolerance
        await outbox.close()

    asyncio.run(main())


def test_a_receiver_that_fails_twice_gets_the_event_on_the_third_attempt(redis_server):
    async def main():
        outbox = _outbox(redis_server, _prefix())
        async with Receiver([500, 500, 200]).running() as receiver:
            event_id = await outbox.enqueue("j1", receiver.url, job_event("j1", "SUCCEEDED"),
                                            "main", now=T0)  # fmt: skip
            assert await _send(outbox, T0) == {event_id: "retry"}
            assert await _send(outbox, T0 + 9.9) == {}  # backoff: 10 s, then 20 s
            assert await _send(outbox, T0 + 10) == {event_id: "retry"}
            assert await _send(outbox, T0 + 29.9) == {}
            assert await _send(outbox, T0 + 30) == {event_id: "delivered"}
            assert await _send(outbox, T0 + 10_000) == {}
        assert len(receiver.got) == 3
        assert {h["webhook-id"] for h, _ in receiver.got} == {event_id}
        assert [h["webhook-timestamp"] for h, _ in receiver.got] == [
            str(int(T0)), str(int(T0 + 10)), str(int(T0 + 30))]  # fmt: skip
        attempts = await outbox.attempts("j1")
        assert [(a.at, a.status) for a in attempts] == [(T0, 500), (T0 + 10, 500), (T0 + 30, 200)]
        assert attempts[0].error.startswith("HTTP 500") and attempts[2].error == ""
        assert await outbox.state(event_id) == "delivered"
        await outbox.close()

    asyncio.run(main())


def test_a_tenant_without_a_secret_fails_only_its_own_event(redis_server):
    from sdserve.jobs.webhook_sender import WebhookSender

    sender = WebhookSender.__new__(WebhookSender)  # only its secret lookup
    sender.policy = type("Policy", (), {"secret": staticmethod(
        lambda tenant: SECRET if tenant == "main" else None)})()  # fmt: skip

    async def main():
        outbox = _outbox(redis_server, _prefix())
        async with Receiver().running() as receiver:
            good = await outbox.enqueue("j1", receiver.url, job_event("j1", "SUCCEEDED"), "main")
            bad = await outbox.enqueue("j2", receiver.url, job_event("j2", "SUCCEEDED"), "other")
            async with aiohttp.ClientSession() as session:
                outcomes = await deliver_due(outbox, session, sender._secret, timeout_s=2.0)
        assert outcomes == {good: "delivered", bad: "retry"}
        (attempt,) = await outbox.attempts("j2")
        assert "no webhook secret for tenant 'other'" in attempt.error
        await outbox.close()

    asyncio.run(main())


def test_a_new_outbox_on_the_same_redis_delivers_what_the_old_one_left_and_only_once(
    redis_server,
):
    async def main():
        prefix = _prefix()
        receiver = Receiver()
        first = _outbox(redis_server, prefix)
        body = job_event("j1", "SUCCEEDED")
        event_id = await first.enqueue("j1", receiver.url, body, "main", now=T0)
        assert await _send(first, T0) == {event_id: "retry"}  # nothing listens yet
        # Claimed and never recorded: the process died mid-send (SIGKILL); no close().
        (lost,) = await first.due(T0 + 10)

        restarted = _outbox(redis_server, prefix)
        async with receiver.running():
            assert await _send(restarted, T0 + 20) == {}  # the dead process's lease holds it
            assert await _send(restarted, T0 + 40) == {event_id: "delivered"}  # lease ran out
            assert await restarted.enqueue("j1", receiver.url, body, "main") == event_id
            assert await _send(restarted, T0 + 10_000) == {}
            assert (
                await first.record_attempt(event_id, None, "late", T0 + 41, claim=lost.claim)
                == "stale"
            )
            assert await _send(restarted, T0 + 20_000) == {}
        assert len(receiver.got) == 1
        statuses = [a.status for a in await restarted.attempts("j1")]
        assert statuses == [None, 200, None]  # the late failure is logged, and decides nothing
        await restarted.close()

    asyncio.run(main())


def test_a_slow_receiver_times_out_and_a_redirect_is_not_followed(redis_server):
    async def main():
        outbox = _outbox(redis_server, _prefix())
        async with Receiver(delay_s=0.3).running() as slow:
            event_id = await outbox.enqueue("j1", slow.url, b"{}", "main", now=T0)
            assert await _send(outbox, T0, timeout_s=0.1) == {event_id: "retry"}
        async with Receiver([307]).running() as moved:
            event_id = await outbox.enqueue("j2", moved.url, b"{}", "main", now=T0)
            assert await _send(outbox, T0) == {event_id: "retry"}
        (timed_out,) = await outbox.attempts("j1")
        assert timed_out.status is None and "Timeout" in timed_out.error
        (redirected,) = await outbox.attempts("j2")
        assert redirected.status == 307 and len(moved.got) == 1
        await outbox.close()

    asyncio.run(main())


def test_two_workers_never_claim_the_same_event(redis_server):
    async def main():
        prefix = _prefix()
        outboxes = [_outbox(redis_server, prefix) for _ in range(4)]
        for i in range(20):
            await outboxes[0].enqueue(f"j{i}", "http://127.0.0.1:9/", b"{}", "main", now=T0)
        claimed = await asyncio.gather(*(o.due(T0, limit=20) for o in outboxes))
        ids = [d.event_id for batch in claimed for d in batch]
        assert sorted(ids) == sorted(f"j{i}:event" for i in range(20))
        for outbox in outboxes:
            await outbox.close()

    asyncio.run(main())


def test_past_retry_for_s_the_event_is_dead_and_kept_with_its_attempts(redis_server):
    async def main():
        outbox = _outbox(redis_server, _prefix(), retry_for_s=30.0)
        async with Receiver([503]).running() as receiver:
            event_id = await outbox.enqueue("j1", receiver.url, job_event("j1", "FAILED"),
                                            "main", now=T0)  # fmt: skip
            assert await _send(outbox, T0) == {event_id: "retry"}
            assert await _send(outbox, T0 + 10) == {event_id: "retry"}  # next at T0 + 30
            assert await _send(outbox, T0 + 30) == {event_id: "dead"}  # next would be T0 + 70
            assert await _send(outbox, T0 + 10_000) == {}
        assert len(receiver.got) == 3
        assert await outbox.state(event_id) == "dead"
        assert await outbox.dead() == [event_id]
        attempts = await outbox.attempts("j1")
        assert [(a.at, a.status) for a in attempts] == [(T0, 503), (T0 + 10, 503), (T0 + 30, 503)]
        assert all("503" in a.error for a in attempts)
        ttl = await outbox.redis.ttl(f"{outbox.prefix}event:{event_id}")
        assert ttl == -1  # kept until someone deletes it
        await outbox.close()

    asyncio.run(main())


def test_seeded_full_jitter_stays_under_the_exponential_delay(redis_server):
    async def main():
        outbox = _outbox(redis_server, _prefix(), jitter=True, seed=7)
        event_id = await outbox.enqueue("j1", "http://127.0.0.1:9/", b"{}", "main", now=T0)
        assert await outbox.record_attempt(event_id, None, "refused", T0) == "retry"
        due_at = await outbox.redis.zscore(f"{outbox.prefix}due", event_id)
        assert T0 <= due_at < T0 + 10
        await outbox.close()

    asyncio.run(main())


@pytest.mark.parametrize(
    "url",
    ["https://hooks.example.com/x", "http://HOOKS.example.com:8080/x", "http://10.0.0.5:9000/y"],
)
def test_an_allowed_host_passes_with_or_without_a_port_in_the_entry(url):
    check_callback_url(url, ["hooks.example.com", "10.0.0.5:9000"])


@pytest.mark.parametrize(
    ("url", "why"),
    [
        ("https://evil.example.com/x", "not on the webhook allow-list"),
        ("https://hooks.example.com.evil.net/x", "not on the webhook allow-list"),
        ("http://10.0.0.5:9001/y", "not on the webhook allow-list"),  # the entry names 9000
        ("http://10.0.0.5/y", "not on the webhook allow-list"),  # port 80
        ("ftp://hooks.example.com/x", "http:// or https://"),
        ("file:///etc/passwd", "http:// or https://"),
        ("hooks.example.com/x", "http:// or https://"),
        ("http:///x", "names no host"),
        ("http://hooks.example.com:99999/x", "invalid port"),
        ("http://hooks.example.com/a b", "without spaces"),
        ("http://u:p@hooks.example.com/x", "credentials"),
    ],
)
def test_a_url_off_the_list_or_malformed_is_refused_naming_callback_url(url, why):
    with pytest.raises((InvalidArgument, PermissionDenied)) as refused:
        check_callback_url(url, ["hooks.example.com", "10.0.0.5:9000"])
    assert str(refused.value).startswith("callback_url: ") and why in str(refused.value)
    off_list = "allow-list" in why  # the host is refused, not the URL's form
    assert isinstance(refused.value, PermissionDenied if off_list else InvalidArgument)


def test_an_empty_allow_list_refuses_every_url():
    with pytest.raises(PermissionDenied, match="callback_url"):
        check_callback_url("https://hooks.example.com/x", [])
