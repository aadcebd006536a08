"""Every Redis key the job queue uses, named in one place.

Every key starts with `prefix` ("sdserve:" by default, `jobs.key_prefix`), so several
deployments can share one Redis:

    {prefix}queue:{high,normal,low}  a Redis Stream per priority; one entry per job, read by the
                                     consumer group GROUP. An entry is acknowledged (XACK) and
                                     deleted only once its job has ended, in the same script
                                     that stores the result, so XLEN over the three streams is
                                     the number of jobs waiting or running.
    {prefix}job:ID                   a hash: state, priority, request, attempts, step and
                                     total_steps, error, timestamps, the worker running it. It
                                     expires `result_ttl_s` after the job ended; a job that has
                                     not ended never expires.
    {prefix}result:ID                the serialized result, with the same TTL.
    {prefix}events:ID                a short stream of state changes and steps (WatchJob).
    {prefix}idem:TENANT:KEY          idempotency key -> job id; it expires with the job. Keys
                                     are per tenant, so one tenant cannot learn another's ids.
    {prefix}webhooks:pending         a set of the job hashes (keys) of ended jobs with a
                                     callback URL whose event is not in the webhook outbox yet:
                                     the script that ends a job adds it, so no end is lost
                                     between the job's end and its event (webhook_outbox.py).
"""

from __future__ import annotations

from dataclasses import dataclass

PRIORITIES = ("high", "normal", "low")
"""Priority levels, highest first. Workers always take the highest waiting one."""

GROUP = "workers"
"""The consumer group every worker reads the queue streams with."""


@dataclass(frozen=True)
class Keys:
    prefix: str = "sdserve:"

    def job(self, job_id: str) -> str:
        return f"{self.prefix}job:{job_id}"

    def result(self, job_id: str) -> str:
        return f"{self.prefix}result:{job_id}"

    def events(self, job_id: str) -> str:
        return f"{self.prefix}events:{job_id}"

    def idempotency(self, key: str, tenant: str = "") -> str:
        return f"{self.prefix}idem:{tenant}:{key}"

    def tenant_jobs(self, tenant: str) -> str:
        """A sorted set of the tenant's job ids by submission time (`GET /v1/jobs`)."""
        return f"{self.prefix}tenant-jobs:{tenant}"

    @property
    def webhook_pending(self) -> str:
        return f"{self.prefix}webhooks:pending"

    def job_id(self, job_key: str) -> str:
        """The id in a job hash's key (`job`)."""
        return job_key.removeprefix(f"{self.prefix}job:")

    def queue(self, priority: str) -> str:
        return f"{self.prefix}queue:{priority}"

    @property
    def queues(self) -> list[str]:
        """The queue streams, highest priority first."""
        return [self.queue(p) for p in PRIORITIES]
