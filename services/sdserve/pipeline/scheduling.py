"""Which requests the Denoiser engine admits, and which of its running requests a forward
takes: request classes, deadlines, tenants, and preemption at step boundaries.

`engine.scheduling: priority` (the default):

- **Classes.** Interactive requests (Generate, GenerateStream, the HTTP API: a person waits)
  come before bulk ones (jobs), and bulk jobs by their own priority (high, normal, low).
- **Deadlines.** Within a class and priority, earliest deadline first; requests without a
  deadline after those with one, in arrival order.
- **Tenants.** Within a class and priority, tenants take turns by the work they were given
  (start-time fair queuing: the tenant that was admitted the fewest image-steps goes next, a
  tenant that returns from idle starts level with the others), so one tenant's flood cannot
  starve another's requests; each tenant's own requests go by deadline.
- **Preemption.** While interactive requests run, bulk images beyond
  `engine.bulk_images_with_interactive` (default 0) sit out the forwards: they pause at a step
  boundary, their latents and scheduler state kept where they are, and resume where they
  stopped once no interactive request runs. On a CPU a forward's time grows with its rows, so
  a bulk image in an interactive request's forward slows that request down. Each image has its
  own scheduler and generator, so a paused and resumed image equals its unpaused run. Buckets
  with interactive requests take the forwards first.

`engine.scheduling: fifo` is the policy before it, kept to compare: first come, first served
within a bucket, every running request in every forward of its bucket, buckets in turn.

This module is plain Python over `DenoiseJob`s; the engine calls it under its lock.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

from sdserve.pipeline.denoise import DenoiseJob

Buckets = dict[tuple[int, ...], list[DenoiseJob]]
"""The engine's running requests by latent shape."""

INTERACTIVE, BULK = "interactive", "bulk"
REQUEST_CLASSES = (INTERACTIVE, BULK)
POLICIES = ("priority", "fifo")
PRIORITY_RANK = {"high": 0, "normal": 1, "low": 2}
"""A bulk job's priority ("" counts as normal); interactive requests have none."""


def rank(job: DenoiseJob) -> tuple[int, int]:
    """(class, priority): lower goes first."""
    return (0 if job.request_class == INTERACTIVE else 1, PRIORITY_RANK.get(job.priority, 1))


def order_key(job: DenoiseJob) -> tuple:
    """Class, priority, then earliest deadline, then arrival."""
    deadline = job.deadline if job.deadline is not None else math.inf
    return (*rank(job), deadline, job.submitted_at)


def interactive(job: DenoiseJob) -> bool:
    return job.request_class == INTERACTIVE


class FairOrder:
    """The order waiting requests are offered to the running batch: by class and priority,
    then tenants in turn by work received, each tenant's requests by deadline."""

    def __init__(self) -> None:
        self.served: dict[tuple[tuple[int, int], str], float] = {}
        """Image-steps admitted per (class and priority, tenant), for tenants with requests
        waiting; the smallest is kept at 0."""

    def order(self, waiting: Iterable[DenoiseJob]) -> list[DenoiseJob]:
        groups: dict[tuple[int, int], dict[str, list[DenoiseJob]]] = {}
        for job in sorted(waiting, key=order_key):
            groups.setdefault(rank(job), {}).setdefault(job.tenant, []).append(job)
        self._forget_idle(groups)
        ordered = []
        for group_rank in sorted(groups):
            tenants = groups[group_rank]
            served = {t: self.served.get((group_rank, t), 0.0) for t in tenants}
            if len(tenants) == 1:
                ordered.extend(next(iter(tenants.values())))
                continue
            queues = {t: list(reversed(jobs)) for t, jobs in tenants.items()}
            while queues:  # the tenant given least so far, then by its next request's key
                tenant = min(queues, key=lambda t: (served[t], order_key(queues[t][-1])))
                job = queues[tenant].pop()
                served[tenant] += job.images * job.total
                ordered.append(job)
                if not queues[tenant]:
                    del queues[tenant]
        return ordered

    def charge(self, job: DenoiseJob) -> None:
        """A request was admitted: its tenant has been given its image-steps."""
        key = (rank(job), job.tenant)
        self.served[key] = self.served.get(key, 0.0) + job.images * job.total

    def _forget_idle(self, groups: dict[tuple[int, int], dict[str, list[DenoiseJob]]]) -> None:
        """Keeps counts only for tenants with requests waiting, the least of each group at 0:
        a tenant back from idle starts level with the busiest, with no credit saved up."""
        kept = {}
        for group_rank, tenants in groups.items():
            counts = {t: self.served.get((group_rank, t)) for t in tenants}
            known = [c for c in counts.values() if c is not None]
            floor = min(known) if known else 0.0
            for tenant, count in counts.items():
                count = floor if count is None else count
                kept[(group_rank, tenant)] = max(0.0, count - floor)
        self.served = kept


def fits(job: DenoiseJob, bucket: list[DenoiseJob], max_images: int, bulk_beside: int,
         interactive_running: bool) -> bool:  # fmt: skip
    """Whether the priority policy admits `job` into its bucket now. An interactive request
    counts only the bucket's interactive images (bulk ones pause for it); a bulk job is
    admitted only where it would run at once: no bulk job of the bucket is paused, it fits,
    and beside interactive requests within `bulk_beside` bulk images."""
    if interactive(job):
        return sum(j.images for j in bucket if interactive(j)) + job.images <= max_images
    if any(j.paused_since is not None for j in bucket):
        return False
    active = sum(j.images for j in bucket if j.paused_since is None)
    bulk = sum(j.images for j in bucket if not interactive(j))
    beside_ok = not interactive_running or bulk + job.images <= bulk_beside
    return beside_ok and active + job.images <= max_images


def plan(running: Buckets, max_images: int, bulk_beside: int,
         now: float) -> list[DenoiseJob]:  # fmt: skip
    """Decides, at a step boundary, which running requests take part in forwards: pauses
    (and resumes) bulk jobs. Returns the jobs paused now (newly)."""
    interactive_running = any(interactive(j) for jobs in running.values() for j in jobs)
    paused_now = []
    for jobs in running.values():
        used = bulk_used = 0
        for job in sorted(jobs, key=order_key):
            bulk = not interactive(job)
            allowed = not (bulk and interactive_running and bulk_used + job.images > bulk_beside)
            runs = allowed and used + job.images <= max_images
            if runs:
                used += job.images
                bulk_used += job.images if bulk else 0
                if job.paused_since is not None:
                    job.paused_s += now - job.paused_since
                    job.paused_since = None
            elif job.paused_since is None:
                job.paused_since = now
                paused_now.append(job)
    return paused_now


def active(jobs: list[DenoiseJob]) -> list[DenoiseJob]:
    """The jobs of a bucket that take part in its forwards (not paused)."""
    return [job for job in jobs if job.paused_since is None]


def next_bucket(turns: list[tuple[int, ...]], running: Buckets) -> tuple[int, ...] | None:
    """The bucket whose forward runs next: the first in turn order with an active interactive
    request, else the first with any active request; None: nothing can run."""
    with_jobs = [s for s in turns if active(running.get(s, []))]
    for shape in with_jobs:
        if any(interactive(j) for j in active(running[shape])):
            return shape
    return with_jobs[0] if with_jobs else None
