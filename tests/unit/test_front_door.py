"""sdserve's own gRPC front door (serve/front_door.py) on a real grpc.aio server and real TLS
handshakes, with a stand-in servicer: TLS and mutual TLS, health that follows the stages, the
error decorator's statuses, and a client's cancellation and deadline reaching the handler."""

from __future__ import annotations

import asyncio
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from helpers import free_port
from tls_certs import write_certs

from sdserve.config import SdserveConfig
from sdserve.errors import InvalidArgument
from sdserve.metrics import StatsLogger
from sdserve.orchestration.health import StageHealth
from sdserve.serve import front_door
from sdserve.serve.errors import grpc_errors
from sdserve.v1 import diffusion_pb2, diffusion_pb2_grpc

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


class Servicer(diffusion_pb2_grpc.DiffusionServiceServicer):
    """ListModels answers; Generate fails validation; GenerateStream yields once, then waits
    for the client (recording how it ended and the deadline it saw)."""

    def __init__(self):
        self.stats = StatsLogger()
        self.ended: asyncio.Queue = asyncio.Queue()
        self.deadlines: list[float | None] = []

    @grpc_errors(diffusion_pb2.ListModelsResponse)
    async def ListModels(self, request, grpc_context):
        return diffusion_pb2.ListModelsResponse(models=[diffusion_pb2.ModelInfo(name="tiny")])

    @grpc_errors(diffusion_pb2.GenerateResponse)
    async def Generate(self, request, grpc_context):
        raise InvalidArgument("steps", "must be at least 1")

    @grpc_errors(diffusion_pb2.GenerateEvent)
    async def GenerateStream(self, request, grpc_context):
        from sdserve.serve._ray import request_deadline

        self.deadlines.append(request_deadline(grpc_context))
        try:
            yield diffusion_pb2.GenerateEvent(queued=diffusion_pb2.Queued(position=0))
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            self.ended.put_nowait("cancelled")
            raise


class Stages:
    """A model's stage client whose probe answers, fails or hangs as the test says."""

    def __init__(self):
        self.state = "up"

    async def stage_infos(self):
        if self.state == "dead":
            raise ConnectionError("the replica's process is gone")
        if self.state == "hung":
            await asyncio.sleep(60)
        return []


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    return write_certs(tmp_path_factory.mktemp("tls"))


def _config(**server) -> SdserveConfig:
    return SdserveConfig(server={"grpc_port": free_port(), **server})


async def _serve(config: SdserveConfig, stages: dict | None = None):
    servicer = Servicer()
    health = front_door.Health(StageHealth(stages or {"tiny": Stages()}, ttl_s=0.2,
                                           timeout_s=0.5), lambda: False)  # fmt: skip
    server = await front_door.start(servicer, health, config)
    return server, servicer


def _target(config: SdserveConfig) -> str:
    return f"127.0.0.1:{config.server.grpc_port}"


def _credentials(certs, cert=None, key=None) -> grpc.ChannelCredentials:
    read = lambda path: path.read_bytes() if path else None  # noqa: E731
    return grpc.ssl_channel_credentials(certs.ca.read_bytes(), read(key), read(cert))


async def _list_models(channel) -> list[str]:
    stub = diffusion_pb2_grpc.DiffusionServiceStub(channel)
    reply = await stub.ListModels(diffusion_pb2.ListModelsRequest(), timeout=5)
    return [m.name for m in reply.models]


def test_tls_serves_a_client_that_trusts_the_ca_and_refuses_plaintext(certs):
    async def main():
        config = _config(tls_cert=str(certs.server_cert), tls_key=str(certs.server_key))
        server, _ = await _serve(config)
        try:
            async with grpc.aio.secure_channel(_target(config), _credentials(certs)) as ch:
                assert await _list_models(ch) == ["tiny"]
            async with grpc.aio.insecure_channel(_target(config)) as ch:
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    await _list_models(ch)
                assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        finally:
            await server.stop(None)

    asyncio.run(main())


def test_mutual_tls_needs_a_client_certificate_the_ca_signed(certs):
    async def main():
        config = _config(tls_cert=str(certs.server_cert), tls_key=str(certs.server_key),
                         tls_client_ca=str(certs.ca))  # fmt: skip
        server, _ = await _serve(config)
        target = _target(config)
        try:
            refused = [_credentials(certs),  # no certificate: the handshake fails
                       _credentials(certs, certs.stranger_cert, certs.stranger_key)]  # fmt: skip
            for credentials in refused:
                async with grpc.aio.secure_channel(target, credentials) as ch:
                    with pytest.raises(grpc.aio.AioRpcError) as err:
                        await _list_models(ch)
                    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
            signed = _credentials(certs, certs.client_cert, certs.client_key)
            async with grpc.aio.secure_channel(target, signed) as ch:
                assert await _list_models(ch) == ["tiny"]
        finally:
            await server.stop(None)

    asyncio.run(main())


def test_errors_arrive_as_their_status_and_a_cancelled_stream_ends_its_handler():
    async def main():
        config = _config()
        server, servicer = await _serve(config)
        try:
            async with grpc.aio.insecure_channel(_target(config)) as ch:
                stub = diffusion_pb2_grpc.DiffusionServiceStub(ch)
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    await stub.Generate(diffusion_pb2.GenerateRequest(), timeout=5)
                assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
                assert err.value.details() == "steps: must be at least 1"
                for _ in range(20):  # every client cancellation reaches the handler
                    call = stub.GenerateStream(diffusion_pb2.GenerateRequest(), timeout=30)
                    await call.read()
                    call.cancel()
                    assert await asyncio.wait_for(servicer.ended.get(), 2) == "cancelled"
                call = stub.GenerateStream(diffusion_pb2.GenerateRequest(), timeout=0.5)
                await call.read()
                assert await asyncio.wait_for(servicer.ended.get(), 2) == "cancelled"
                assert await call.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            # the handler saw the client's deadline (20 streams of 30 s, then one of 0.5 s)
            assert abs(servicer.deadlines[-1] - time.time()) < 2
            assert all(d is not None for d in servicer.deadlines)
        finally:
            await server.stop(None)

    asyncio.run(main())


def test_health_follows_the_stages_per_model_and_watch_sees_each_change():
    async def main():
        stages = {"tiny": Stages(), "other": Stages()}
        config = _config()
        server, _ = await _serve(config, stages)
        try:
            async with grpc.aio.insecure_channel(_target(config)) as ch:
                health = health_pb2_grpc.HealthStub(ch)

                async def check(service=""):
                    request = health_pb2.HealthCheckRequest(service=service)
                    return (await health.Check(request, timeout=5)).status

                watch = health.Watch(health_pb2.HealthCheckRequest(), timeout=30)
                assert (await watch.read()).status == SERVING
                assert await check() == SERVING
                for state in ("dead", "hung"):
                    stages["other"].state = state
                    died = time.monotonic()
                    assert (await watch.read()).status == NOT_SERVING
                    assert time.monotonic() - died < 2  # ttl 0.2 s + probe timeout 0.5 s
                    assert await check() == NOT_SERVING
                    assert await check("sdserve.v1.DiffusionService") == NOT_SERVING
                    assert await check("other") == NOT_SERVING
                    assert await check("tiny") == SERVING
                    stages["other"].state = "up"
                    assert (await watch.read()).status == SERVING
                    assert await check() == SERVING
                watch.cancel()
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    await check("no.such.Service")
                assert err.value.code() == grpc.StatusCode.NOT_FOUND
        finally:
            await server.stop(None)

    asyncio.run(main())


def test_a_message_over_the_limit_is_refused_before_the_servicer_sees_it():
    async def main():
        config = _config()
        config = config.model_copy(update={"limits": config.limits.model_copy(
            update={"max_message_bytes": 1024 * 1024})})  # fmt: skip
        server, servicer = await _serve(config)
        try:
            async with grpc.aio.insecure_channel(_target(config)) as ch:
                stub = diffusion_pb2_grpc.DiffusionServiceStub(ch)
                huge = diffusion_pb2.GenerateRequest(init_image=b"\0" * (2 * 1024 * 1024))
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    await stub.Generate(huge, timeout=5)
                assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
                assert await _list_models(ch) == ["tiny"]  # it keeps serving
        finally:
            await server.stop(None)

    asyncio.run(main())
