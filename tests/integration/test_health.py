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


def test_a_plaintext_client_cannot_call_the_tls_port(server):
    with grpc.insecure_channel(server.target) as plaintext, pytest.raises(grpc.RpcError) as err:
        health_pb2_grpc.HealthStub(plaintext).Check(health_pb2.HealthCheckRequest(), timeout=10)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE


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


def test_list_models_through_reflection_alone(channel):
    """What `grpcurl 127.0.0.1:9000 sdserve.v1.DiffusionService/ListModels` does: find the
    method and its messages by reflection, build them dynamically (no generated code), call."""
    from google.protobuf import descriptor_pool, json_format, message_factory
    from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
        ProtoReflectionDescriptorDatabase,
    )

    pool = descriptor_pool.DescriptorPool(ProtoReflectionDescriptorDatabase(channel))
    method = pool.FindServiceByName("sdserve.v1.DiffusionService").FindMethodByName("ListModels")
    request_cls = message_factory.GetMessageClass(method.input_type)
    reply_cls = message_factory.GetMessageClass(method.output_type)
    call = channel.unary_unary(
        "/sdserve.v1.DiffusionService/ListModels",
        request_serializer=request_cls.SerializeToString,
        response_deserializer=reply_cls.FromString,
    )
    reply = json_format.MessageToDict(call(request_cls(), timeout=30))
    assert [m["name"] for m in reply["models"]] == ["default", "shapes", "sdxl", "sd3", "flux"]
    assert [m["family"] for m in reply["models"]] == ["sd1", "sd1", "sdxl", "sd3", "flux"]
