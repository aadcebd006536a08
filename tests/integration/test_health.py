"""Standard gRPC health checking and server reflection on the public port."""

from __future__ import annotations

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

pytestmark = pytest.mark.integration


def test_health_check_serving(channel):
    stub = health_pb2_grpc.HealthStub(channel)
    for service in ("", "sdserve.v1.DiffusionService"):
        reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=30)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
    with pytest.raises(grpc.RpcError) as err:
        stub.Check(health_pb2.HealthCheckRequest(service="no.such.Service"), timeout=30)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND


def test_reflection_lists_the_services(channel):
    from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
        ProtoReflectionDescriptorDatabase,
    )

    database = ProtoReflectionDescriptorDatabase(channel)
    services = set(database.get_services())
    assert {"sdserve.v1.DiffusionService", "grpc.health.v1.Health"} <= services
    # `grpcurl describe` works too: the request message is resolvable by name.
    proto = database.FindFileContainingSymbol("sdserve.v1.GenerateRequest")
    assert proto.package == "sdserve.v1"
