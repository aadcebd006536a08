"""The HTTP API: OpenAI's Images API over the same request path as the gRPC API.

    POST /v1/images/generations      generate (JSON, or server-sent events with `stream: true`)
    GET  /v1/images/{id}/{index}.png an image made with `response_format: url`, until it expires
    GET  /v1/models                  the served models, in OpenAI's list shape
    GET  /healthz                    200 while every stage of every model answers; else 503
    /v1/jobs...                      jobs in the Redis queue (`sdserve.http.jobs_api`)
    GET  /, /playground/NAME         the web playground (`sdserve.http.playground`)

It takes Starlette requests and returns Starlette responses, and knows nothing of Ray: the
Pipeline deployment (`sdserve.serve.ingress`) hands it the requests Serve's HTTP proxy routes
to the application, and tests drive it over the in-process stage client. Errors are OpenAI's
error JSON with the HTTP status of the gRPC code (400, 401, 404, 429, 503, ...).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import asdict

from sse_starlette import EventSourceResponse, ServerSentEvent
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from sdserve.api.auth import ApiKeys
from sdserve.api.proto import fields_from_pb
from sdserve.api.types import GenerateParams, Preview, Progress, Result
from sdserve.constants import DIT_FAMILIES, UNET_SCHEDULER_NAMES
from sdserve.errors import InvalidArgument, NotFound, SdserveError, Unavailable
from sdserve.http import openai_images as oai
from sdserve.http.jobs_api import JobsApi, jobs_route
from sdserve.http.playground import is_playground, playground_file
from sdserve.jobs.images import ImageStore
from sdserve.jobs.queue import JobQueue
from sdserve.metrics import StatsLogger
from sdserve.orchestration.path import StagePath, Who
from sdserve.stats import RpcDone

logger = logging.getLogger(__name__)

DIT_SCHEDULERS = ("flow_euler",)
"""The diffusion transformers' one sampler (`sdserve.constants.SCHEDULER_NAMES`)."""
IMAGE_PATH = re.compile(r"^/v1/images/([0-9a-f]{32})/(\d{1,3})\.png$")


class BodyTooLarge(InvalidArgument):
    """A request body over `http.max_body_bytes`: HTTP 413 (INVALID_ARGUMENT over gRPC)."""

    http_status = 413

    def __init__(self, limit: int):
        super().__init__("body", f"is larger than http.max_body_bytes = {limit} bytes")


def default_status(exc: BaseException, request_id: str) -> tuple[str, str]:
    """(gRPC code name, message) of an error (the Pipeline passes the gRPC interceptor's)."""
    if isinstance(exc, SdserveError):
        return exc.code, str(exc)
    return "INTERNAL", (f"internal error ({type(exc).__name__}); look for request "
                        f"{request_id} in the server logs")  # fmt: skip


class HttpApi:
    """Serves the routes above; `await api.handle(request, request_id)` -> a Response."""

    ping_s: float = 15.0
    """A stream sends a comment line (`: ping ...`) every this many seconds, so that proxies keep
    a long generation's connection open (SSE clients skip comments)."""

    def __init__(
        self,
        path: StagePath,
        *,
        keys: ApiKeys | None = None,
        images: ImageStore | None = None,
        stats: StatsLogger | None = None,
        admitted: Callable = lambda params, deadline, tenant: contextlib.nullcontext(),
        draining: Callable[[], bool] = lambda: False,
        healthy: Callable[[], Awaitable[bool]] | None = None,
        error_status: Callable[[BaseException, str], tuple[str, str]] = default_status,
        jobs: JobQueue | None = None,
    ):
        self.path, self.keys, self.images = path, keys, images
        self.stats = stats or StatsLogger()
        self.admitted, self.draining, self.error_status = admitted, draining, error_status
        self.healthy = healthy
        """Whether every stage answers now (`orchestration.health`); None: not checked."""
        config = path.config
        self.max_body_bytes = config.http.max_body_bytes
        self.max_image_bytes = config.limits.max_image_bytes
        self.jobs = JobsApi(path, jobs, self.max_image_bytes) if jobs is not None else None

    async def handle(self, request: Request, request_id: str = "") -> Response:
        """Routes one request; every error becomes OpenAI's error JSON."""
        started = time.perf_counter()
        method, route = request.method, request.url.path
        code = "OK"
        try:
            if route == "/v1/images/generations" and method == "POST":
                return await self._generations(request, request_id)
            if method == "GET" and (match := IMAGE_PATH.match(route)):
                route = "/v1/images/{id}/{index}.png"
                return await self._image(match[1], int(match[2]))
            if route == "/v1/models" and method == "GET":
                self._tenant(request)
                return JSONResponse(await self._models())
            if route == "/healthz" and method == "GET":
                return await self._health()
            if method == "GET" and is_playground(route):
                return playground_file(route)
            if self.jobs is not None and self.jobs.matches(route):
                route = jobs_route(route)  # (the metric's label: no job ids)
                return await self._jobs(request, method, route=request.url.path)
            raise NotFound(f"no route {method} {route}")
        except Exception as exc:
            code, message = self.error_status(exc, request_id)
            log = logger.exception if code == "INTERNAL" else logger.info
            log("HTTP %s %s (request %s): %s %s", method, route, request_id, code, message)
            status, body = oai.error_body(code, message, getattr(exc, "field", None))
            status = getattr(exc, "http_status", status)
            headers = {}
            if getattr(exc, "retry_after_s", None) is not None:
                headers["retry-after"] = str(max(1, round(exc.retry_after_s)))
            return JSONResponse(body, status_code=status, headers=headers)
        finally:
            seconds = time.perf_counter() - started
            self.stats.record(RpcDone(f"HTTP {method} {route}", code, seconds))

    def _tenant(self, request: Request) -> str:
        """The caller's tenant from `Authorization: Bearer KEY` ("" without keys); raises
        Unauthenticated."""
        if self.keys is None:
            return ""
        return self.keys.tenant({"authorization": request.headers.get("authorization", "")})

    def _refuse_if_draining(self) -> None:
        if self.draining():
            raise Unavailable("sdserve is shutting down and takes no new work; retry shortly")

    async def _json(self, request: Request):
        """The body as JSON (None when empty). Raises InvalidArgument, BodyTooLarge."""
        try:
            return json.loads(await self._body(request) or b"null")
        except ValueError:
            raise InvalidArgument("body", "is not valid JSON") from None

    async def _jobs(self, request: Request, method: str, route: str) -> Response:
        tenant = self._tenant(request)
        if method == "POST" and route == "/v1/jobs":
            self._refuse_if_draining()
        body = await self._json(request) if method == "POST" else None
        return await self.jobs.handle(method, route, body, tenant)

    async def _generations(self, request: Request, request_id: str) -> Response:
        tenant = self._tenant(request)
        self._refuse_if_draining()
        body = await self._json(request)
        parsed = oai.parse_generation(body, max_image_bytes=self.max_image_bytes)
        params = await self.path.validate(fields_from_pb(parsed.request))
        if parsed.stream:
            events = self._stream(params, parsed, request_id, tenant)
            return EventSourceResponse(events, ping=self.ping_s)
        with self.admitted(params, None, tenant):
            result = await self._result(params, request_id, tenant)
        size = f"{params.width}x{params.height}"
        urls = None
        if parsed.response_format == "url":
            urls = await self._keep(result.pngs, request)
        extra = {"request_id": result.request_id, "seeds": params.seeds,
                 "model": params.model, "steps": params.steps}  # fmt: skip
        return JSONResponse(oai.images_response(list(result.pngs), params.prompt, urls=urls,
                                                size=size, extra=extra, nsfw=result.nsfw,
                                                blocked=result.blocked))  # fmt: skip

    async def _body(self, request: Request) -> bytes:
        """The body, read no further than `max_body_bytes`: a client cannot make the ingress
        hold more. Refused at once when Content-Length already says it is larger."""
        limit = self.max_body_bytes
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            raise BodyTooLarge(limit)
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise BodyTooLarge(limit)
            chunks.append(chunk)
        return b"".join(chunks)

    async def _result(self, params: GenerateParams, request_id: str, tenant: str) -> Result:
        async for event in self.path.run(params, request_id=request_id, who=Who(tenant=tenant)):
            if isinstance(event, Result):
                return event
        raise RuntimeError("the request path ended without a result")

    async def _keep(self, pngs, request: Request) -> list[str]:
        """Stores the images in Redis and returns their URLs on this server."""
        if self.images is None:
            raise Unavailable("response_format url needs the job queue's Redis")
        image_id = await self.images.put(pngs)
        base = str(request.base_url).rstrip("/")
        return [f"{base}/v1/images/{image_id}/{i}.png" for i in range(len(pngs))]

    async def _stream(self, params: GenerateParams, parsed: oai.ImagesRequest, request_id: str,
                      tenant: str) -> AsyncIterator[ServerSentEvent]:  # fmt: skip
        """Server-sent events: up to `partial_images` partial images (the Denoiser's cheap
        previews, spread over the steps), a progress event per step with `stream_progress`,
        then the completed image (with its seed and request id). An error after the stream
        started is an `error` event. A client that disconnects cancels the request: its steps
        stop at the next step boundary."""
        partial = parsed.partial_images
        size = f"{params.width}x{params.height}"
        runs = int(params.steps * params.strength) if params.init_image else params.steps
        every = max(1, runs // (partial + 1)) if partial else 0
        sent, total = 0, runs
        try:
            with self.admitted(params, None, tenant):
                events = self.path.run(params, request_id=request_id, stream=True,
                                       preview_every=every, who=Who(tenant=tenant))  # fmt: skip
                async for event in events:
                    if isinstance(event, Progress):
                        total = event.total
                        if parsed.stream_progress:
                            yield oai.progress_event(event.step, event.total)
                    elif isinstance(event, Preview) and sent < partial and event.step < total:
                        yield oai.stream_event("partial_image", event.pngs[0], size=size,
                                               index=sent)  # fmt: skip
                        sent += 1
                    elif isinstance(event, Result):
                        safety = (oai.safety_fields(event.nsfw[0], event.blocked[0])
                                  if event.nsfw else None)  # fmt: skip
                        extra = {"seed": params.seeds[0], "request_id": event.request_id}
                        yield oai.stream_event("completed", event.pngs[0], size=size,
                                               safety=safety, extra=extra)  # fmt: skip
        except Exception as exc:
            code, message = self.error_status(exc, request_id)
            logger.info("HTTP stream of request %s: %s %s", request_id, code, message)
            yield oai.error_event(code, message, getattr(exc, "field", None))

    async def _image(self, image_id: str, index: int) -> Response:
        png = await self.images.get(image_id, index) if self.images is not None else None
        if png is None:
            raise NotFound(f"no image {image_id}/{index} (unknown, or it expired)")
        return Response(png, media_type="image/png")

    async def _models(self) -> dict:
        """OpenAI's model list; each entry also has the model's fields (`ServedModel`), its
        samplers and its LoRA adapters' names."""
        models = await self.path.models()
        loras = await asyncio.gather(*(self.path.loras(m.name) for m in models))
        data = [{"id": m.name, "object": "model", "created": 0, "owned_by": "sdserve",
                 **{k: v for k, v in asdict(m).items() if k != "name"},
                 "schedulers": list(DIT_SCHEDULERS if m.family in DIT_FAMILIES
                                    else UNET_SCHEDULER_NAMES),
                 "loras": [f.name for f in files]}
                for m, (_, files) in zip(models, loras, strict=True)]  # fmt: skip
        return {"object": "list", "data": data}

    async def _health(self) -> Response:
        if self.draining():
            return JSONResponse({"status": "draining"}, status_code=503)
        names = list(self.path.clients)
        if self.healthy is not None and not await self.healthy():
            return JSONResponse({"status": "not serving", "models": names}, status_code=503)
        return JSONResponse({"status": "ok", "models": names})
