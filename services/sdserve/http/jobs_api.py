"""Jobs over HTTP: the same Redis job queue as the gRPC API's SubmitJob/GetJob/CancelJob, for
the web playground and any HTTP client.

    POST /v1/jobs                         {"request": {<generations fields>}, "priority": ...}
    GET  /v1/jobs                         the caller's tenant's jobs, newest first (100 at most)
    GET  /v1/jobs/{id}                    one job
    POST /v1/jobs/{id}/cancel             cancel it (a running job stops at its next step)
    GET  /v1/jobs/{id}/images/{i}.png     an image of a job that SUCCEEDED

A job, as JSON: `id`, `state` (QUEUED, RUNNING, SUCCEEDED, FAILED, CANCELLED), `priority`,
`step`, `total_steps`, `attempts`, `error`, `prompt`, `model`, `created_at`, `finished_at`, and
once it SUCCEEDED `images`: [{"url", "seed"}]. Another tenant's job is NOT_FOUND (404), as for
a job that does not exist.
"""

from __future__ import annotations

import re

from starlette.responses import JSONResponse, Response

from sdserve.api.proto import fields_from_pb
from sdserve.errors import InvalidArgument, NotFound
from sdserve.http import openai_images as oai
from sdserve.jobs.queue import PRIORITIES, JobQueue
from sdserve.jobs.records import JobRecord, JobState
from sdserve.jobs.runner import job_request
from sdserve.orchestration.path import StagePath
from sdserve.v1 import diffusion_pb2

JOB_PATH = re.compile(r"^/v1/jobs/([0-9a-f]{1,64})(/cancel|/images/(\d{1,3})\.png)?$")
"""/v1/jobs/{id}, /v1/jobs/{id}/cancel and /v1/jobs/{id}/images/{index}.png."""

LIST_LIMIT = 100


def jobs_route(route: str) -> str:
    """The route's shape, without the job id (what metrics and logs label it by)."""
    match = JOB_PATH.match(route)
    if match is None:
        return route
    return "/v1/jobs/{id}" + ("/images/{i}.png" if match[3] else match[2] or "")


class JobsApi:
    """The routes above, over `queue` (the tenant comes from the caller's key)."""

    def __init__(self, path: StagePath, queue: JobQueue, max_image_bytes: int):
        self.path, self.queue, self.max_image_bytes = path, queue, max_image_bytes

    def matches(self, route: str) -> bool:
        return route == "/v1/jobs" or JOB_PATH.match(route) is not None

    async def handle(self, method: str, route: str, body, tenant: str) -> Response:
        """Answers one request to a route this `matches`; `body` is the parsed JSON (POST)."""
        if route == "/v1/jobs":
            if method == "POST":
                return JSONResponse(await self._submit(body, tenant))
            if method == "GET":
                records = await self.queue.tenant_jobs(tenant, LIST_LIMIT)
                return JSONResponse({"object": "list", "data": [job_json(r) for r in records]})
        elif match := JOB_PATH.match(route):
            job_id, action, index = match[1], match[2] or "", match[3]
            if method == "GET" and not action:
                return JSONResponse(job_json(await self._own(job_id, tenant)))
            if method == "POST" and action == "/cancel":
                await self._own(job_id, tenant)
                return JSONResponse(job_json(await self.queue.cancel(job_id)))
            if method == "GET" and index is not None:
                return await self._image(await self._own(job_id, tenant, True), int(index))
        raise NotFound(f"no route {method} {route}")

    async def _submit(self, body, tenant: str) -> dict:
        if not isinstance(body, dict) or not isinstance(body.get("request"), dict):
            raise InvalidArgument("request", "is required: the generations fields of the job")
        if set(body) - {"request", "priority"}:
            field = sorted(set(body) - {"request", "priority"})[0]
            raise InvalidArgument(field, "is not a field of a job")
        priority = body.get("priority") or "normal"
        if priority not in PRIORITIES:
            raise InvalidArgument("priority", f"must be one of {', '.join(PRIORITIES)}")
        request = body["request"]
        if request.get("stream"):
            raise InvalidArgument("stream", "a job does not stream; follow it with GET /v1/jobs")
        parsed = oai.parse_generation(request, max_image_bytes=self.max_image_bytes)
        params = await self.path.validate(fields_from_pb(parsed.request))
        job_id, created = await self.queue.submit(job_request(params), total_steps=params.steps,
                                                  priority=priority, tenant=tenant)  # fmt: skip
        return {"id": job_id, "created": created}

    async def _own(self, job_id: str, tenant: str, with_result: bool = False) -> JobRecord:
        record = await self.queue.get(job_id, with_result=with_result)
        if record.tenant != tenant:
            raise NotFound(f"job_id: no job {job_id!r} (unknown, or its result expired)")
        return record

    @staticmethod
    async def _image(record: JobRecord, index: int) -> Response:
        result = diffusion_pb2.GenerateResponse.FromString(record.result or b"")
        if not 0 <= index < len(result.images):
            raise NotFound(f"job {record.job_id} has no image {index} (yet)")
        return Response(result.images[index].png, media_type="image/png")


def job_json(record: JobRecord) -> dict:
    """A job record as the JSON the routes answer."""
    request = diffusion_pb2.GenerateRequest.FromString(record.request)
    job = {
        "id": record.job_id,
        "object": "job",
        "state": record.state.value,
        "priority": record.priority,
        "step": record.step,
        "total_steps": record.total_steps,
        "attempts": record.attempts,
        "error": record.error,
        "prompt": request.prompt,
        "model": request.model,
        "created_at": record.created_at,
        "finished_at": record.finished_at,
    }
    if record.state == JobState.SUCCEEDED:  # image i has seed + i (GenerateParams.seeds)
        base = f"/v1/jobs/{record.job_id}/images"
        job["images"] = [{"url": f"{base}/{i}.png", "seed": (request.seed + i) % 2**64}
                         for i in range(request.num_images)]  # fmt: skip
    return job
