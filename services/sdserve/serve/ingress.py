"""The Pipeline deployment: serves DiffusionService (and grpc.health.v1.Health) on its own
gRPC front door (`serve/front_door.py`; or through Ray Serve's gRPC proxy), and the
OpenAI-compatible HTTP API (`sdserve.http.app`) through Serve's HTTP proxy.
Generate/GenerateStream and the HTTP API run the stage path; the job RPCs talk to the
Redis job queue, and JobWorker replicas run the jobs.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator

from grpc_health.v1 import health_pb2
from ray import serve
from ray.serve.handle import DeploymentHandle
from starlette.requests import Request
from starlette.responses import Response

from sdserve.api.auth import ApiKeys
from sdserve.api.proto import (
    event_to_pb,
    fields_from_pb,
    job_priority_name,
    job_to_pb,
    result_to_pb,
    served_model_to_pb,
)
from sdserve.api.types import Result
from sdserve.config import ModelConfig
from sdserve.errors import Internal, InvalidArgument, NotFound, Unavailable
from sdserve.http.app import HttpApi
from sdserve.jobs.images import ImageStore
from sdserve.jobs.queue import JobQueue
from sdserve.jobs.runner import job_request
from sdserve.jobs.webhook_sender import WebhookPolicy, outbox_for
from sdserve.orchestration.admission import Admission
from sdserve.orchestration.health import StageHealth
from sdserve.orchestration.path import StagePath, Who
from sdserve.orchestration.tenant_limits import TenantLimits
from sdserve.serve import _ray, front_door
from sdserve.serve.admin import AdminServicer
from sdserve.serve.client import ServeStageClient, StageHandles, stage_clients
from sdserve.serve.common import replica_setup, watch_drain
from sdserve.serve.errors import grpc_errors, status_name
from sdserve.serve.runtime_models import RuntimeModels
from sdserve.stats import QueueDepth
from sdserve.v1 import diffusion_pb2

# Serve's logger: its lines carry the replica and the request id, and land in Serve's logs.
logger = logging.getLogger("ray.serve")

MAX_IDEMPOTENCY_KEY_CHARS = 256
MAX_JOB_ID_CHARS = 64


@serve.deployment(name="Pipeline")
class PipelineIngress:
    async def __init__(
        self,
        models: dict[str, StageHandles],
        job_worker: DeploymentHandle | None,
        config: dict,
    ):
        """`models`: each served model's stage deployments, the default model first."""
        self.config, self.stats = replica_setup(config)  # grpc_errors records into stats
        key_file = self.config.server.api_key_file
        self._keys = ApiKeys.load(key_file) if key_file else None
        # Per replica: with N ingress replicas a tenant may send N times its limits in all.
        self._tenant_limits = TenantLimits.from_config(self.config, record=self.stats.record)
        clients = stage_clients(models, self.config.server.stage_transport)
        self._path = StagePath(clients, self.config, self.stats)
        # Bound so that Serve deploys the JobWorker; jobs reach it through Redis, not calls.
        self._job_worker = job_worker
        # Connects on first use: without Redis, Generate serves and the job RPCs are UNAVAILABLE.
        self._jobs = JobQueue.from_config(self.config.jobs)
        self._webhooks = WebhookPolicy(self.config)
        self._outbox = None  # the webhook outbox, opened when a job with a callback is read
        images = ImageStore(self._jobs.redis, self._jobs.url, self._jobs.prefix,
                            self.config.http.image_ttl_s)  # fmt: skip
        self._http = HttpApi(self._path, keys=self._keys, images=images, stats=self.stats,
                             admitted=self._admitted, draining=lambda: self._draining,
                             error_status=status_name, healthy=self.serving,
                             jobs=self._jobs)  # fmt: skip
        self._draining = False
        self._health = front_door.Health(StageHealth(clients), lambda: self._draining)
        # Models added at runtime (AdminService): each replica follows the registry.
        self._runtime = RuntimeModels(self.config, self._add_model, self._remove_model,
                                      self._path.inflight.__getitem__)  # fmt: skip
        self._front_door = None
        if self.config.server.front_door == "sdserve":
            admin = AdminServicer(self.config, self._keys, self.stats, self._runtime)
            self._front_door = await front_door.start(self, self._health, self.config, admin)
        loop = asyncio.get_running_loop()
        self._runtime_task = loop.create_task(self._runtime.run())
        self._drain_watch = loop.create_task(watch_drain(self.config.server.app_name, self._drain))
        self._poller = None
        if self.stats.metrics.enabled:
            self._poller = loop.create_task(self._poll_queue())
        self._admission: dict[str, Admission] = {}  # per model: each has its own Denoiser
        self._load_watch: dict[str, asyncio.Task] = {}
        for name, client in clients.items():
            self._watch_load(name, client)

    def _watch_load(self, model: str, client: ServeStageClient) -> None:
        """Load shedding for `model` (where `admission` is on): its Denoiser's load, polled."""
        admission = self.config.admission
        if admission.enabled:
            self._admission[model] = Admission(
                admission.max_wait_s, admission.margin, admission.slack_s
            )
            watch = self._poll_load(model, client, admission.poll_s)
            self._load_watch[model] = asyncio.get_running_loop().create_task(watch)

    def _add_model(self, model: ModelConfig, handles: StageHandles) -> None:
        """A model added at runtime: route requests to it from now on."""
        client = ServeStageClient(handles, self.config.server.stage_transport)
        self._path.add_model(model, client)
        self._health.stages.clients[model.name] = client
        self._watch_load(model.name, client)

    def _remove_model(self, name: str) -> None:
        """A model being removed: no new requests for it (the running ones go on)."""
        self._path.remove_model(name)
        self._health.stages.clients.pop(name, None)
        self._admission.pop(name, None)
        watch = self._load_watch.pop(name, None)
        if watch is not None:
            watch.cancel()

    async def _poll_load(self, model: str, client: ServeStageClient, every_s: float) -> None:
        """Keeps load shedding's view of a model's Denoiser current."""
        while True:
            try:
                self._admission[model].update(await client.denoiser_stats())
            except Exception as exc:  # shedding pauses (admits all) rather than fail requests
                logger.warning("reading the Denoiser's load of model %s failed: %s", model, exc)
                await asyncio.sleep(1.0)
            await asyncio.sleep(every_s)

    @contextlib.contextmanager
    def _admitted(self, params, deadline: float | None, tenant: str = ""):
        """The tenant's limits, then load shedding: admits the request for the block, or
        RESOURCE_EXHAUSTED at once (with a retry-after hint)."""
        admission = self._admission.get(params.model)
        with self._tenant_limits.admitted(tenant):
            if admission is None:
                yield
                return
            with admission.admitted(params, deadline):
                yield

    async def _poll_queue(self, every_s: float = 5.0) -> None:
        """Records the queue depth per priority, and whether Redis answers."""
        while True:
            try:
                self.stats.record(QueueDepth(await self._jobs.queue_lengths()))
            except Unavailable:
                self.stats.record(QueueDepth(None))
            except Exception:  # a metric must never take the ingress down
                logger.exception("polling the job queue's length failed")
            await asyncio.sleep(every_s)

    async def __del__(self) -> None:
        """Serve stops the replica: the front door refuses new calls and gives running ones a
        few seconds (Serve's own graceful shutdown waits for them before this)."""
        if self._front_door is not None:
            await self._front_door.stop(grace=5.0)

    async def serving(self) -> bool:
        """Whether every stage of every model answers and the server is not draining (what
        `sdserve serve` waits for at start-up, through Serve rather than the gRPC port)."""
        return await self._health.status("") == front_door.SERVING

    def _drain(self) -> None:
        """`sdserve serve` is shutting down (server.drain): refuse new work from now on."""
        self._draining = True
        logger.info("draining: new Generate/SubmitJob calls are refused")

    def _tenant(self, grpc_context) -> str:
        """The caller's tenant, from its API key ("" when the server has no keys).
        Raises Unauthenticated."""
        if self._keys is None:
            return ""
        return self._keys.tenant(dict(grpc_context.invocation_metadata()))

    async def _own_job(self, request: diffusion_pb2.GetJobRequest, grpc_context) -> str:
        """The job id of the request, if the caller's tenant submitted that job; NOT_FOUND
        otherwise, exactly as for a job that does not exist."""
        tenant = self._tenant(grpc_context)
        job_id = _job_id(request)
        if (await self._jobs.get(job_id, with_result=False)).tenant != tenant:
            raise NotFound(f"job_id: no job {job_id!r} (unknown, or its result expired)")
        return job_id

    def _refuse_if_draining(self) -> None:
        if self._draining:
            raise Unavailable("sdserve is shutting down and takes no new work; retry shortly")

    async def __call__(self, request: Request) -> Response:
        """The HTTP API (what Serve's HTTP proxy sends the application): `sdserve.http.app`."""
        return await self._http.handle(request, _ray.current_request_id())

    @grpc_errors(diffusion_pb2.GenerateResponse)
    async def Generate(
        self, request: diffusion_pb2.GenerateRequest, grpc_context
    ) -> diffusion_pb2.GenerateResponse:
        """DiffusionService.Generate."""
        tenant = self._tenant(grpc_context)
        self._refuse_if_draining()
        params = await self._path.validate(fields_from_pb(request))
        deadline = _ray.request_deadline(grpc_context)
        with self._admitted(params, deadline, tenant):
            events = self._path.run(params, request_id=_ray.current_request_id(),
                                    deadline=deadline, who=Who(tenant=tenant))  # fmt: skip
            async for event in events:
                if isinstance(event, Result):
                    return result_to_pb(event)
        raise Internal("the pipeline ended without a result")

    @grpc_errors(diffusion_pb2.GenerateEvent)
    async def GenerateStream(
        self, request: diffusion_pb2.GenerateRequest, grpc_context
    ) -> AsyncIterator[diffusion_pb2.GenerateEvent]:
        """DiffusionService.GenerateStream: queued, progress (+ previews), result."""
        tenant = self._tenant(grpc_context)
        self._refuse_if_draining()
        params = await self._path.validate(fields_from_pb(request))
        deadline = _ray.request_deadline(grpc_context)
        with self._admitted(params, deadline, tenant):
            async for event in self._path.run(
                params,
                request_id=_ray.current_request_id(),
                stream=True,
                preview_every=request.preview_every,
                deadline=deadline,
                who=Who(tenant=tenant),
            ):
                yield event_to_pb(event)

    @grpc_errors(diffusion_pb2.SubmitJobResponse)
    async def SubmitJob(
        self, request: diffusion_pb2.SubmitJobRequest, grpc_context
    ) -> diffusion_pb2.SubmitJobResponse:
        """DiffusionService.SubmitJob: validate, resolve every parameter, queue."""
        tenant = self._tenant(grpc_context)
        self._refuse_if_draining()
        if not request.HasField("request"):
            raise InvalidArgument("request", "is required")
        if len(request.idempotency_key) > MAX_IDEMPOTENCY_KEY_CHARS:
            raise InvalidArgument(
                "idempotency_key", f"is longer than {MAX_IDEMPOTENCY_KEY_CHARS} characters"
            )
        priority = job_priority_name(request.priority)
        if request.callback_url:
            self._webhooks.check(request.callback_url, tenant)
        try:
            params = await self._path.validate(fields_from_pb(request.request))
        except InvalidArgument as exc:
            raise InvalidArgument(f"request.{exc.field}", exc.reason) from None
        job_id, created = await self._jobs.submit(
            job_request(params),
            total_steps=params.steps,
            priority=priority,
            idempotency_key=request.idempotency_key or None,
            tenant=tenant,
            callback_url=request.callback_url,
        )
        logger.info(
            "job %s %s (%s priority, %d steps)",
            job_id, "queued" if created else "exists for that idempotency key", priority,
            params.steps,
        )  # fmt: skip
        return diffusion_pb2.SubmitJobResponse(job_id=job_id, created=created)

    @grpc_errors(diffusion_pb2.Job)
    async def GetJob(self, request: diffusion_pb2.GetJobRequest, grpc_context) -> diffusion_pb2.Job:
        """DiffusionService.GetJob, with the attempts at delivering its end to its callback."""
        record = await self._jobs.get(await self._own_job(request, grpc_context))
        if not record.callback_url:
            return job_to_pb(record)
        if self._outbox is None:
            self._outbox = outbox_for(self.config)
        return job_to_pb(record, await self._outbox.attempts(record.job_id))

    @grpc_errors(diffusion_pb2.Job)
    async def WatchJob(
        self, request: diffusion_pb2.GetJobRequest, grpc_context
    ) -> AsyncIterator[diffusion_pb2.Job]:
        """DiffusionService.WatchJob: every change until the job ends."""
        async for record in self._jobs.watch(await self._own_job(request, grpc_context)):
            yield job_to_pb(record)

    @grpc_errors(diffusion_pb2.Job)
    async def CancelJob(
        self, request: diffusion_pb2.GetJobRequest, grpc_context
    ) -> diffusion_pb2.Job:
        """DiffusionService.CancelJob."""
        record = await self._jobs.cancel(await self._own_job(request, grpc_context))
        logger.info("job %s: cancel requested, now %s", record.job_id, record.state.value)
        return job_to_pb(record)

    @grpc_errors(diffusion_pb2.ListModelsResponse)
    async def ListModels(
        self, request: diffusion_pb2.ListModelsRequest, grpc_context
    ) -> diffusion_pb2.ListModelsResponse:
        """DiffusionService.ListModels: the served models, the default first."""
        self._tenant(grpc_context)
        models = await self._path.models()
        return diffusion_pb2.ListModelsResponse(models=[served_model_to_pb(m) for m in models])

    @grpc_errors(diffusion_pb2.ListLorasResponse)
    async def ListLoras(
        self, request: diffusion_pb2.ListLorasRequest, grpc_context
    ) -> diffusion_pb2.ListLorasResponse:
        """DiffusionService.ListLoras: a model's adapter files, as its Denoiser sees them."""
        self._tenant(grpc_context)
        model, files = await self._path.loras(request.model)
        loras = [diffusion_pb2.LoraInfo(name=f.name, file_bytes=f.file_bytes, loaded=f.loaded)
                 for f in files]  # fmt: skip
        return diffusion_pb2.ListLorasResponse(model=model, loras=loras)

    @grpc_errors(diffusion_pb2.ListControlNetsResponse)
    async def ListControlNets(
        self, request: diffusion_pb2.ListControlNetsRequest, grpc_context
    ) -> diffusion_pb2.ListControlNetsResponse:
        """DiffusionService.ListControlNets: a model's ControlNets, as its Denoiser sees them."""
        self._tenant(grpc_context)
        model, nets = await self._path.controlnets(request.model)
        infos = [diffusion_pb2.ControlNetInfo(name=n.name, file_bytes=n.file_bytes,
                                              loaded=n.loaded, misfit=n.misfit)
                 for n in nets]  # fmt: skip
        return diffusion_pb2.ListControlNetsResponse(model=model, controlnets=infos)

    @grpc_errors(health_pb2.HealthCheckResponse)
    async def Check(
        self, request: health_pb2.HealthCheckRequest, grpc_context
    ) -> health_pb2.HealthCheckResponse:
        """grpc.health.v1.Health/Check through Serve's gRPC proxy (`front_door.Health` on the
        own front door, which also has Watch): SERVING while every stage answers."""
        status = await self._health.status(request.service)
        if status == front_door.SERVICE_UNKNOWN:
            raise NotFound(f"unknown service {request.service!r}")
        return health_pb2.HealthCheckResponse(status=status)


def _job_id(request: diffusion_pb2.GetJobRequest) -> str:
    if not request.job_id:
        raise InvalidArgument("job_id", "is required")
    if len(request.job_id) > MAX_JOB_ID_CHARS:
        raise InvalidArgument("job_id", f"is longer than {MAX_JOB_ID_CHARS} characters")
    return request.job_id
