"""The admin calls of the Python client (AdminService: models added and removed at runtime),
their requests and their results. They need an API key with the admin role."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from sdserve.client._calls import Rpc
from sdserve.client.types import _SameFields
from sdserve.v1 import admin_pb2


@dataclass(frozen=True)
class AdminModel(_SameFields):
    """A served model as the admin API sees it."""

    name: str
    path: str
    """Its folder ("" for the built-in model)."""
    source: str
    """"config" (the config file's) or "added" (at runtime)."""
    state: str
    """"serving", or for an added model "deploying" or "removing"."""
    application: str
    """The Serve application its deployments belong to."""


@dataclass(frozen=True)
class ModelAdded:
    model: AdminModel
    seconds: float
    """From the call to the model answering on every ingress replica."""

    @classmethod
    def from_pb(cls, pb: admin_pb2.AddModelResponse) -> ModelAdded:
        return cls(AdminModel.from_pb(pb.model), pb.seconds)


@dataclass(frozen=True)
class ModelRemoved(_SameFields):
    drained_requests: int
    """Requests it held when removal began; each ran to its end."""
    seconds: float


def add_model(name: str, path: str, settings: dict[str, Any]) -> Rpc:
    request = admin_pb2.AddModelRequest(
        name=name, path=path, config_json=json.dumps(settings) if settings else ""
    )
    return Rpc("AddModel", request, ModelAdded.from_pb, admin=True)


def remove_model(name: str) -> Rpc:
    return Rpc("RemoveModel", admin_pb2.RemoveModelRequest(name=name), ModelRemoved.from_pb,
               admin=True)  # fmt: skip


def admin_models() -> Rpc:
    return Rpc("ListModels", admin_pb2.AdminListModelsRequest(),
               lambda reply: [AdminModel.from_pb(m) for m in reply.models], admin=True)  # fmt: skip
