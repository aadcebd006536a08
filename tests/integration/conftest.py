"""One Ray instance and one sdserve application for the whole integration session."""

from __future__ import annotations

from dataclasses import dataclass

import grpc
import pytest
from helpers import free_port

from sdserve.config import ModelConfig, SdserveConfig, ServerConfig


@dataclass
class Server:
    target: str
    config: SdserveConfig


@pytest.fixture(scope="session")
def server(tiny_model, tmp_path_factory):
    """sdserve on the tiny model, on free ports of 127.0.0.1 (Ray's GCS port is free too)."""
    from sdserve import server as sdserve_server

    config = SdserveConfig(
        model=ModelConfig(path=str(tiny_model), cache_dir=str(tmp_path_factory.mktemp("cache"))),
        server=ServerConfig(grpc_port=free_port(), http_port=free_port()),
    )
    sdserve_server.start_ray(config)
    try:
        sdserve_server.deploy(config)
        target = f"127.0.0.1:{config.server.grpc_port}"
        sdserve_server.wait_healthy(target)
        yield Server(target=target, config=config)
    finally:
        sdserve_server.shutdown()


@pytest.fixture(scope="session")
def channel(server):
    with grpc.insecure_channel(server.target) as ch:
        yield ch


@pytest.fixture(scope="session")
def stub(channel):
    from sdserve.v1 import diffusion_pb2_grpc

    return diffusion_pb2_grpc.DiffusionServiceStub(channel)
