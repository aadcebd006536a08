"""sdserve's own gRPC front door: a `grpc.aio` server in each Pipeline (ingress) replica.

It is the default (`server.front_door: sdserve`); Ray Serve's gRPC proxy remains an option
(`serve-proxy`). Why not the proxy (docs/architecture.md): it forwards a client's cancellation
best effort (about one cancelled stream in five kept its batch slot to the end, measured here),
binds plaintext only (no TLS option, ray-project/ray#34103), and hides the call's context (the
deadline reached the ingress only through a hook on a private class). Here the ingress's own
methods are the servicer: when a client leaves, grpc cancels the handler's task, which cancels
the stage call in flight (`serve/client.py`'s `cancel_on_exit`); the deadline is the call's own.

It keeps one hop and scales with the ingress: every ingress replica binds
`server.grpc_host:server.grpc_port` with SO_REUSEPORT (gRPC sets it on Linux), so the replicas
on one node share the port and the kernel spreads connections over them; a cluster exposes the
port on each node that runs an ingress replica, as it exposed Serve's proxy.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from sdserve.config import SdserveConfig, ServerConfig
from sdserve.orchestration.health import StageHealth
from sdserve.v1 import admin_pb2, admin_pb2_grpc, diffusion_pb2, diffusion_pb2_grpc

logger = logging.getLogger("ray.serve")

SERVICE_NAME = diffusion_pb2.DESCRIPTOR.services_by_name["DiffusionService"].full_name
ADMIN_SERVICE_NAME = admin_pb2.DESCRIPTOR.services_by_name["AdminService"].full_name
HEALTH_SERVICE_NAME = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
SERVICE_UNKNOWN = health_pb2.HealthCheckResponse.SERVICE_UNKNOWN


class Health(health_pb2_grpc.HealthServicer):
    """grpc.health.v1.Health that tells the truth: SERVING only while every stage of every
    served model answers (`StageHealth`'s probe, at most about a second old) and the server is
    not draining. Service names: "" and "sdserve.v1.DiffusionService" (every model), and each
    served model's name (that model alone)."""

    def __init__(self, stages: StageHealth, draining: Callable[[], bool]):
        self.stages = stages
        self._draining = draining

    async def status(self, service: str) -> int:
        """The HealthCheckResponse status of `service` now (SERVICE_UNKNOWN: no such name)."""
        if service in ("", SERVICE_NAME):
            healthy = await self.stages.all_healthy()
        elif service in self.stages.clients:
            healthy = await self.stages.healthy(service)
        else:
            return SERVICE_UNKNOWN
        return SERVING if healthy and not self._draining() else NOT_SERVING

    async def Check(self, request, context) -> health_pb2.HealthCheckResponse:
        status = await self.status(request.service)
        if status == SERVICE_UNKNOWN:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"unknown service {request.service!r}")
        return health_pb2.HealthCheckResponse(status=status)

    async def Watch(self, request, context) -> AsyncIterator[health_pb2.HealthCheckResponse]:
        """The status now, then each change (checked every `StageHealth.ttl_s`)."""
        last = None
        while True:
            status = await self.status(request.service)
            if status != last:
                yield health_pb2.HealthCheckResponse(status=status)
                last = status
            await asyncio.sleep(self.stages.ttl_s)


def credentials(server: ServerConfig) -> grpc.ServerCredentials | None:
    """TLS from `tls_cert`/`tls_key` (None: plaintext); with `tls_client_ca`, mutual TLS: a
    client must present a certificate that CA signed, or the handshake fails."""
    if not server.tls_cert:
        return None
    pair = (Path(server.tls_key).read_bytes(), Path(server.tls_cert).read_bytes())
    client_ca = Path(server.tls_client_ca).read_bytes() if server.tls_client_ca else None
    return grpc.ssl_server_credentials(
        [pair], root_certificates=client_ca, require_client_auth=client_ca is not None
    )


async def start(servicer, health: Health, config: SdserveConfig, admin=None) -> grpc.aio.Server:
    """Starts the front door for `servicer` (the ingress: DiffusionService's methods) with
    health, reflection and `admin` (AdminService's servicer, `serve/admin.py`; None: none).
    Raises RuntimeError when the port cannot be bound."""
    limit = config.limits.max_message_bytes
    server = grpc.aio.server(
        options=[
            ("grpc.so_reuseport", 1),  # the node's ingress replicas share the port
            ("grpc.max_receive_message_length", limit),
            ("grpc.max_send_message_length", limit),
        ]
    )
    diffusion_pb2_grpc.add_DiffusionServiceServicer_to_server(servicer, server)
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    names = (SERVICE_NAME, HEALTH_SERVICE_NAME, reflection.SERVICE_NAME)
    if admin is not None:
        admin_pb2_grpc.add_AdminServiceServicer_to_server(admin, server)
        names += (ADMIN_SERVICE_NAME,)
    reflection.enable_server_reflection(names, server)
    address = f"{config.server.grpc_host or config.server.host}:{config.server.grpc_port}"
    tls = credentials(config.server)
    port = server.add_secure_port(address, tls) if tls else server.add_insecure_port(address)
    if not port:
        raise RuntimeError(f"cannot bind the gRPC front door to {address}")
    await server.start()
    security = "mutual TLS" if config.server.tls_client_ca else "TLS" if tls else "plaintext"
    logger.info("gRPC front door on %s (%s)", address, security)
    return server
