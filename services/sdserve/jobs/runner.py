"""Runs a queued job through the request path: what a job worker's `run` callback does.

A job's request is stored as `GenerateRequest` bytes with every parameter resolved at
submission (`job_request`: the seed, steps, size, sampler and guidance the defaults gave then),
so an attempt after a redeploy with other defaults makes the same images. Its result is stored
as `GenerateResponse` bytes, which GetJob returns as they are. In between, the job takes the same
`StagePath` as Generate, so jobs and synchronous requests share the Denoiser's running batch.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable

from sdserve.api.proto import fields_from_pb, params_to_pb, result_to_pb
from sdserve.api.types import GenerateParams, Progress, Result
from sdserve.errors import Internal
from sdserve.jobs.records import JobRecord
from sdserve.jobs.worker import Report
from sdserve.orchestration.path import StagePath, Who
from sdserve.v1 import diffusion_pb2


def job_request(params: GenerateParams) -> bytes:
    """What SubmitJob stores: the validated request with every optional field set."""
    return params_to_pb(params).SerializeToString()


class JobRunner:
    """`await runner(request, job_id, report)`: one attempt at a job (a `jobs.worker.Runner`)."""

    def __init__(
        self,
        path: StagePath,
        bind_request_id: Callable[[str], None] | None = None,
        progress_interval_s: float = 0.25,
        timeout_s: float = 0.0,
        record: Callable[[str], Awaitable[JobRecord]] | None = None,
    ):
        self.path = path
        self.record = record
        """Reads a job's record (its priority and tenant, which the Denoiser schedules it by:
        jobs are bulk requests); None: a normal-priority job of no tenant."""
        self.bind_request_id = bind_request_id
        """Called with the job's request id ("job-<id>") before the stages are called; the Serve
        shell uses it so that every replica's log lines about the job carry that id."""
        self.progress_interval_s = progress_interval_s
        self.timeout_s = timeout_s
        """An attempt's deadline, from its start (0: none)."""
        """Steps are reported at most this often (the first and the last always): every step
        would cost a Denoiser stream message and a Redis write (1.14x a Generate's time for
        a 25-step job on the default model, against 1.03x without)."""

    async def __call__(self, request: bytes, job_id: str, report: Report) -> bytes:
        """GenerateRequest bytes in, GenerateResponse bytes out, `report(step, total)` per
        step. Raises what the stages raise (InvalidArgument fails the job at once)."""
        request_id = f"job-{job_id}"
        if self.bind_request_id is not None:
            self.bind_request_id(request_id)
        request_pb = diffusion_pb2.GenerateRequest.FromString(request)
        params = await self.path.validate(fields_from_pb(request_pb))
        deadline = time.time() + self.timeout_s if self.timeout_s else None
        who = Who("bulk")
        if self.record is not None:
            job = await self.record(job_id)
            who = Who("bulk", job.priority, job.tenant)
        events = self.path.run(params, request_id=request_id, stream=True, deadline=deadline,
                               progress_interval_s=self.progress_interval_s, who=who)  # fmt: skip
        async for event in events:
            if isinstance(event, Progress):
                await report(event.step, event.total)
            elif isinstance(event, Result):
                return result_to_pb(event).SerializeToString()
        raise Internal("the request path ended without a result")
