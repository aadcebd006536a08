"""AdminService: adding and removing models while sdserve serves (protos/sdserve/v1/admin.proto).

It runs in each Pipeline (ingress) replica, on sdserve's own gRPC front door. Only keys with the
admin role in the key file may call it (`ApiKeys.admin`).

- **AddModel** checks the request (name, folder, settings), claims the name in the registry
  (`model_registry`), deploys the model as an application of its own (`model_apps`), waits for
  Serve to run it, marks it serving, and answers once this replica routes to it. The other
  replicas follow within `runtime_models.POLL_S`. Nothing else is redeployed.
- **RemoveModel** marks the model removing: every replica stops taking requests for it and
  reports what it still holds. Once those reports reach zero (or `REMOVE_TIMEOUT_S` passes), it
  deletes the model's application and forgets it.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time

import pydantic

from sdserve.api.auth import ApiKeys
from sdserve.config import ModelConfig, SdserveConfig
from sdserve.constants import resolve_model_dir
from sdserve.errors import (
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    Unavailable,
)
from sdserve.metrics import StatsLogger
from sdserve.serve import _ray
from sdserve.serve.errors import grpc_errors
from sdserve.serve.model_apps import model_app_name
from sdserve.serve.model_registry import DEPLOYING, REMOVING, SERVING, Entry
from sdserve.serve.runtime_models import RuntimeModels
from sdserve.v1 import admin_pb2, admin_pb2_grpc

logger = logging.getLogger("ray.serve")

ADD_TIMEOUT_S = 600.0
"""The longest AddModel waits for Serve to run the model's replicas (loading weights on a busy
node takes minutes); past it the deployment is deleted and the call fails (UNAVAILABLE)."""

REMOVE_TIMEOUT_S = 600.0
"""The longest RemoveModel waits for the requests a model holds; then it deletes it anyway."""


class AdminServicer(admin_pb2_grpc.AdminServiceServicer):
    """The admin RPCs of one ingress replica; `runtime` is that replica's view of the added
    models, whose `served` this waits on."""

    def __init__(self, config: SdserveConfig, keys: ApiKeys | None, stats: StatsLogger,
                 runtime: RuntimeModels):  # fmt: skip
        self.config = config
        self.stats = stats  # grpc_errors records each call here
        self._keys = keys
        self._runtime = runtime
        self._registry = runtime.registry

    def _admin(self, grpc_context) -> str:
        """The caller's tenant; PERMISSION_DENIED unless its key has the admin role."""
        if self._keys is None:
            raise PermissionDenied("admin calls need an API key with the 'admin' role: this "
                                   "server has no key file (server.api_key_file)")  # fmt: skip
        return self._keys.admin(dict(grpc_context.invocation_metadata()))

    @grpc_errors(admin_pb2.AddModelResponse)
    async def AddModel(self, request: admin_pb2.AddModelRequest, grpc_context
                       ) -> admin_pb2.AddModelResponse:  # fmt: skip
        """AdminService.AddModel."""
        tenant = self._admin(grpc_context)
        started = time.monotonic()
        model = self._model_config(request)
        await asyncio.to_thread(self._check_folder, model)
        if any(
            m.name == model.name for m in self.config.served_models
        ) or not await asyncio.to_thread(self._registry.claim, model):
            raise InvalidArgument("name", f"a model named {model.name!r} is served already")
        logger.info("admin (tenant %r): adding model %s from %s", tenant, model.name, model.path)
        app = model_app_name(self.config.server.app_name, model.name)
        try:
            await self._deploy(model, app)
        except BaseException:
            await asyncio.to_thread(_ray.delete_app, app)
            await asyncio.to_thread(self._registry.drop, model.name)
            raise
        await asyncio.to_thread(self._registry.set_state, model.name, SERVING)
        await self._until(lambda: model.name in self._runtime.served, 30.0)
        seconds = time.monotonic() - started
        logger.info("admin: model %s added in %.1fs", model.name, seconds)
        entry = Entry(model, SERVING, time.time(), time.time())
        return admin_pb2.AddModelResponse(model=self._to_pb(entry), seconds=seconds)

    @grpc_errors(admin_pb2.RemoveModelResponse)
    async def RemoveModel(self, request: admin_pb2.RemoveModelRequest, grpc_context
                          ) -> admin_pb2.RemoveModelResponse:  # fmt: skip
        """AdminService.RemoveModel."""
        tenant = self._admin(grpc_context)
        started = time.monotonic()
        name = request.name
        if any(m.name == name for m in self.config.served_models):
            raise FailedPrecondition(f"name: model {name!r} comes from the config file; edit it "
                                     "and restart to remove it")  # fmt: skip
        entry = await asyncio.to_thread(self._registry.get, name)
        if entry is None or entry.state == DEPLOYING:
            raise NotFound(f"name: no added model {name!r}" +
                           (" (it is being added)" if entry else ""))  # fmt: skip
        logger.info("admin (tenant %r): removing model %s", tenant, name)
        if entry.state != REMOVING:
            await asyncio.to_thread(self._registry.set_state, name, REMOVING)
        since = time.time()
        drained = await self._drain(name, since)
        await asyncio.to_thread(_ray.delete_app, model_app_name(self.config.server.app_name, name))
        await asyncio.to_thread(self._registry.drop, name)
        seconds = time.monotonic() - started
        logger.info("admin: model %s removed in %.1fs (%d request(s) drained)", name, seconds,
                    drained)  # fmt: skip
        return admin_pb2.RemoveModelResponse(drained_requests=drained, seconds=seconds)

    @grpc_errors(admin_pb2.AdminListModelsResponse)
    async def ListModels(self, request: admin_pb2.AdminListModelsRequest, grpc_context
                         ) -> admin_pb2.AdminListModelsResponse:  # fmt: skip
        """AdminService.ListModels: the config file's models, then the added ones."""
        self._admin(grpc_context)
        app = self.config.server.app_name
        models = [admin_pb2.AdminModel(name=m.name, path=m.path or "", source="config",
                                       state=SERVING, application=app)
                  for m in self.config.served_models]  # fmt: skip
        entries = await asyncio.to_thread(self._registry.entries)
        return admin_pb2.AdminListModelsResponse(models=models + [self._to_pb(e) for e in entries])

    def _model_config(self, request: admin_pb2.AddModelRequest) -> ModelConfig:
        """The model's settings from the request. Raises InvalidArgument naming the field."""
        if not request.path:
            raise InvalidArgument("path", "is required (the model's folder on the server)")
        try:
            extra = json.loads(request.config_json) if request.config_json else {}
        except json.JSONDecodeError as exc:
            raise InvalidArgument("config_json", f"is not JSON: {exc}") from None
        if not isinstance(extra, dict):
            raise InvalidArgument("config_json", "must be a JSON object of model settings")
        try:
            return ModelConfig.model_validate({**extra, "name": request.name, "path": request.path})
        except pydantic.ValidationError as exc:
            error = exc.errors()[0]
            where = ".".join(str(part) for part in error["loc"])
            field = where if where in ("name", "path") else f"config_json.{where}"
            raise InvalidArgument(field, error["msg"]) from None

    @staticmethod
    def _check_folder(model: ModelConfig) -> None:
        """The folder exists here and reads as a model. Raises InvalidArgument("path")."""
        root = resolve_model_dir(model.path)
        if not root.is_dir():
            raise InvalidArgument("path", f"no folder {str(root)!r} on the server")
        if not (root / "model_index.json").is_file():
            raise InvalidArgument("path", f"{str(root)!r} is not a diffusers model folder "
                                  "(it has no model_index.json)")  # fmt: skip

    async def _deploy(self, model: ModelConfig, app: str) -> None:
        """Deploys the model's application and waits until Serve runs it.
        Raises FailedPrecondition (it failed to deploy) or Unavailable (timed out)."""
        tree, fields = self.config.model_dump(mode="json"), model.model_dump(mode="json")
        await _ray.run_task("sdserve.serve.app:deploy_model_app", tree, fields)
        deadline = time.monotonic() + ADD_TIMEOUT_S
        while time.monotonic() < deadline:
            status, message = await asyncio.to_thread(_ray.app_status, app)
            if status == "RUNNING":
                return
            if status in ("DEPLOY_FAILED", "UNHEALTHY"):
                raise FailedPrecondition(f"model {model.name!r} failed to deploy: {message}")
            await asyncio.sleep(0.5)
        raise Unavailable(f"model {model.name!r} did not start within {ADD_TIMEOUT_S:.0f}s")

    async def _drain(self, name: str, since: float) -> int:
        """Waits until no replica holds a request for `name`: the most it held at once."""
        await self._until(lambda: name not in self._runtime.served, 30.0)
        grace = since + 3 * self._runtime.poll_s + 1.0  # every replica has read the registry
        deadline = time.monotonic() + REMOVE_TIMEOUT_S
        most = 0
        while time.monotonic() < deadline:
            held, _ = await asyncio.to_thread(self._registry.inflight, name, since)
            most = max(most, held)
            if held == 0 and time.time() > grace:
                return most
            await asyncio.sleep(self._runtime.poll_s)
        logger.warning("admin: model %s still holds requests after %.0fs; deleting it", name,
                       REMOVE_TIMEOUT_S)  # fmt: skip
        return most

    @staticmethod
    async def _until(done, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while not done() and time.monotonic() < deadline:
            await asyncio.sleep(0.05)

    def _to_pb(self, entry: Entry) -> admin_pb2.AdminModel:
        app = model_app_name(self.config.server.app_name, entry.name)
        return admin_pb2.AdminModel(name=entry.name, path=entry.config.path or "",
                                    source="added", state=entry.state, application=app)  # fmt: skip
