"""Webhooks for jobs, wired: who may name which callback URL (`WebhookPolicy`, SubmitJob's
check) and the loop that turns ended jobs into delivered events (`WebhookSender`, in each
JobWorker replica).

A job's end and its webhook cannot be lost between two steps: the script that ends a job (END,
CANCEL, START's dead letter) adds it to the pending set (`Keys.webhook_pending`) in the same
step. The sender moves each pending job's event into the outbox (`webhook_outbox.py`,
idempotent per event id), then takes it out of the set; the outbox holds every delivery's
state in Redis. So a JobWorker killed at any point leaves its work to the next sweep of any
replica, and an event delivered is not sent again without cause.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import time

import aiohttp

from sdserve.config import SdserveConfig
from sdserve.config.tenants import DEFAULT_ENTRY
from sdserve.errors import FailedPrecondition, NotFound
from sdserve.jobs.queue import JobQueue
from sdserve.jobs.webhook_outbox import Backoff, WebhookOutbox
from sdserve.jobs.webhooks import check_callback_url, deliver_due, job_event
from sdserve.v1 import diffusion_pb2

logger = logging.getLogger(__name__)


class WebhookPolicy:
    """The allow-list and the signing secret of each tenant, from the config."""

    def __init__(self, config: SdserveConfig):
        self.webhooks = config.webhooks
        self.tenants = config.tenants

    def _entry(self, tenant: str):
        return self.tenants.get(tenant) or self.tenants.get(DEFAULT_ENTRY)

    def allowed(self, tenant: str) -> tuple[str, ...]:
        entry = self._entry(tenant)
        return self.webhooks.allow + (entry.webhook_allow if entry else ())

    def secret(self, tenant: str) -> str | None:
        entry = self._entry(tenant)
        return (entry.webhook_secret if entry else None) or self.webhooks.secret

    def check(self, url: str, tenant: str) -> None:
        """Refuses a callback URL off the tenant's allow-list (PermissionDenied) or malformed
        (InvalidArgument), or any when no secret would sign its events (FailedPrecondition)."""
        check_callback_url(url, self.allowed(tenant))
        if self.secret(tenant) is None:
            raise FailedPrecondition("callback_url: this server has no webhook secret to sign "
                                     "events with (sdserve serve --webhook-secret, or "
                                     "SDSERVE_WEBHOOK_SECRET)")  # fmt: skip


def outbox_for(config: SdserveConfig) -> WebhookOutbox:
    """The deployment's webhook outbox, on the job queue's Redis."""
    w = config.webhooks
    backoff = Backoff(base_s=w.backoff_s, cap_s=w.backoff_cap_s, retry_for_s=w.retry_for_s)
    return WebhookOutbox(config.jobs.redis_url, key_prefix=config.jobs.key_prefix,
                         backoff=backoff)  # fmt: skip


class WebhookSender:
    """Every `webhooks.poll_s`: ended jobs with a callback URL into the outbox, then due
    deliveries out."""

    def __init__(self, queue: JobQueue, config: SdserveConfig):
        self.queue = queue
        self.policy = WebhookPolicy(config)
        self.outbox = outbox_for(config)
        self.webhooks = config.webhooks

    async def run(self) -> None:
        """Runs until cancelled; a failed sweep (Redis away) is logged and tried again."""
        warned_at = float("-inf")
        async with aiohttp.ClientSession() as session:
            while True:
                try:
                    await self.collect()
                    await deliver_due(self.outbox, session, self._secret,
                                      timeout_s=self.webhooks.timeout_s)  # fmt: skip
                except asyncio.CancelledError:
                    raise
                except Exception as exc:  # once a minute at most: Redis may be away for long
                    if time.monotonic() - warned_at > 60:
                        warned_at = time.monotonic()
                        logger.warning("webhook sweep failed (retried every %.1fs): %s",
                                       self.webhooks.poll_s, exc)  # fmt: skip
                await asyncio.sleep(self.webhooks.poll_s)

    def _secret(self, tenant: str) -> str:
        """The tenant's signing secret. KeyError without one: `deliver_due` records that
        event's attempt as failed and sends the others (one tenant's missing secret must not
        stop every tenant's deliveries)."""
        secret = self.policy.secret(tenant)
        if secret is None:
            raise KeyError(f"no webhook secret for tenant {tenant!r}")
        return secret

    async def collect(self) -> int:
        """Moves each pending job's event into the outbox; returns how many it moved."""
        keys = self.queue.keys
        pending = await self.queue.redis.smembers(keys.webhook_pending)
        for member in pending:
            job_key = member.decode()
            try:
                record = await self.queue.get(keys.job_id(job_key))
            except NotFound:  # expired before anyone sent it: nothing left to announce
                logger.warning("job %s ended with a webhook, but its record is gone", job_key)
            else:
                body = job_event(record.job_id, record.state.value, error=record.error,
                                 images_b64=_images_b64(record.result))  # fmt: skip
                await self.outbox.enqueue(record.job_id, record.callback_url, body,
                                          secret_ref=record.tenant)  # fmt: skip
                logger.info("job %s: its end (%s) queued for %s", record.job_id,
                            record.state.value, record.callback_url)  # fmt: skip
            await self.queue.redis.srem(keys.webhook_pending, member)
        return len(pending)

    async def close(self) -> None:
        await self.outbox.close()


def _images_b64(result: bytes | None) -> list[str] | None:
    """The PNGs of a stored result (GenerateResponse bytes), base64; None without one."""
    if result is None:
        return None
    response = diffusion_pb2.GenerateResponse.FromString(result)
    return [base64.b64encode(image.png).decode() for image in response.images]
