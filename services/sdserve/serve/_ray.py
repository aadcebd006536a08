"""Every private Ray API sdserve uses, in one place (Ray Serve keeps its own in `_private/`).

Each of these can change in any Ray release; `ray[serve]` is pinned to 2.60.x in pyproject.toml.
When upgrading Ray, this module is what to re-check.
"""

from __future__ import annotations

import logging
import time

from ray import serve
from ray.serve import Application, Deployment
from ray.serve.handle import DeploymentHandle

POLLED = frozenset({"Stats", "Info", "serving"})
"""Deployment methods called on a timer, not for a request: the ingress's load polls (Stats),
health probes (Info) and `sdserve serve`'s start-up wait (serving)."""


class _QuietPolls(logging.Filter):
    """Demotes Serve's access log line of a polled method ("CALL Stats OK 1.2ms", several a
    second) to DEBUG: it is left out unless Serve's logger is at DEBUG (its `logging_config`).
    A request's own calls (Encode, DenoiseStream, Decode) keep their INFO line, which carries
    the request id across replicas."""

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "serve_access_log", False):  # Serve's marker on its access lines
            words = record.getMessage().split(maxsplit=2)
            if len(words) > 1 and words[1] in POLLED:
                record.levelno, record.levelname = logging.DEBUG, "DEBUG"
                return logging.getLogger("ray.serve").isEnabledFor(logging.DEBUG)
        return True


def quiet_polls() -> None:
    """Installs `_QuietPolls` on Serve's logger in this replica (once)."""
    serves = logging.getLogger("ray.serve")
    if not any(isinstance(f, _QuietPolls) for f in serves.filters):
        serves.addFilter(_QuietPolls())


def current_request_id() -> str:
    """Serve's id of the request being handled ("" outside a request); Serve's access logs and
    every log line of the replica carry it."""
    try:
        return serve.context._get_serve_request_context().request_id or ""
    except Exception:  # outside a request
        return ""


def set_request_id(request_id: str) -> None:
    """Makes `request_id` the current task's Serve request id. Serve passes it on to the
    deployments this task calls, and their log lines carry it (how a job is followed across
    replicas)."""
    serve.context._set_request_context(request_id=request_id)


def with_transport(handle: DeploymentHandle, transport: str) -> DeploymentHandle:
    """The handle calling through Serve's gRPC transport (`grpc`: `_by_reference=False`, straight
    to the replica, faster for tensors; see DESIGN.md) or Ray actor calls (`actor`)."""
    return handle.options(_by_reference=transport == "actor")


def _drain_key(app_name: str) -> str:
    return f"sdserve/{app_name}/draining"


def set_draining(app_name: str, draining: bool) -> None:
    """Sets or clears the app's drain flag in Ray's cluster KV store, which every replica on
    every node can read (a Serve handle call reaches one replica; a redeploy restarts them)."""
    from ray.experimental import internal_kv

    if draining:
        internal_kv._internal_kv_put(_drain_key(app_name), b"1", overwrite=True)
    else:
        internal_kv._internal_kv_del(_drain_key(app_name))


def is_draining(app_name: str) -> bool:
    """Whether `set_draining(app_name, True)` was called (a millisecond's GCS call)."""
    from ray.experimental import internal_kv

    return bool(internal_kv._internal_kv_get(_drain_key(app_name)))


async def is_draining_async(app_name: str, timeout_s: float = 5.0) -> bool:
    """`is_draining` through the GCS client's asynchronous call, for an event loop."""
    from ray.experimental import internal_kv

    value = await internal_kv.global_gcs_client.async_internal_kv_get(
        _drain_key(app_name).encode(), None, timeout=timeout_s
    )
    return bool(value)


def kv_get(key: str) -> bytes | None:
    """A value of Ray's cluster KV store (what every replica on every node reads), or None."""
    from ray.experimental import internal_kv

    return internal_kv._internal_kv_get(key)


def kv_put(key: str, value: bytes, overwrite: bool = True) -> bool:
    """Stores `value` at `key` (with `overwrite=False` only where the key has none: an atomic
    claim). Returns whether the key had a value before."""
    from ray.experimental import internal_kv

    return internal_kv._internal_kv_put(key, value, overwrite=overwrite)


def kv_keys(prefix: str) -> list[str]:
    """The KV store's keys that start with `prefix`."""
    from ray.experimental import internal_kv

    return [key.decode() for key in internal_kv._internal_kv_list(prefix)]


def kv_del(key: str, by_prefix: bool = False) -> None:
    """Deletes `key` (every key starting with it, `by_prefix`)."""
    from ray.experimental import internal_kv

    internal_kv._internal_kv_del(key, del_by_prefix=by_prefix)


def replica_name() -> str:
    """This Serve replica's unique id ("" outside a replica)."""
    try:
        return serve.get_replica_context().replica_id.unique_id
    except Exception:  # not in a replica (tests, the driver)
        return ""


def deploy_app(app: Application, name: str) -> None:
    """Starts deploying `app` as the application `name`, without an HTTP route, and returns at
    once (`serve.run` would block until it runs, with no bound); `app_status` follows it. The
    other applications are left as they are."""
    serve._run(app, _blocking=False, name=name, route_prefix=None)


async def run_task(function: str, *args):
    """Runs the function at the import path "module:name" in a Ray task (a worker process of
    its own, no CPU reserved) and returns its result: for work that imports what the caller
    must not (building an application imports the stages' torch; the ingress must not)."""
    import ray

    return await ray.remote(num_cpus=0, max_retries=0)(_call).remote(function, *args)


def _call(function: str, *args):
    import importlib

    module, _, name = function.partition(":")
    return getattr(importlib.import_module(module), name)(*args)


def app_status(name: str) -> tuple[str, str]:
    """(Serve's status of the application `name`, its message): "RUNNING", "DEPLOYING",
    "DEPLOY_FAILED", ...; ("NOT_STARTED", "") when there is none."""
    app = serve.status().applications.get(name)
    if app is None:
        return "NOT_STARTED", ""
    return getattr(app.status, "value", str(app.status)), app.message


def delete_app(name: str) -> None:
    """Deletes the application `name` and waits until its replicas are gone (each finishes the
    calls it holds within its graceful_shutdown_timeout_s)."""
    serve.delete(name, _blocking=True)


def ongoing_requests(app_name: str) -> int:
    """Requests running now in every live replica of the app, summed (from the driver)."""
    import ray

    replicas = [
        ray.get_actor(info["Name"], namespace="serve")
        for info in ray._private.state.actors().values()
        if info.get("State") == "ALIVE"
        and info.get("ActorClassName", "").startswith(f"ServeReplica:{app_name}:")
        and info.get("Name")
    ]
    return sum(ray.get([r.get_num_ongoing_requests.remote() for r in replicas]))


def add_diffusion_service(servicer, server) -> None:
    """What Serve's gRPC proxy runs to register DiffusionService (`grpc_servicer_functions`).

    Besides registering the service, it makes the proxy pass each client's deadline on to the
    ingress: Serve copies a few fields of the call's context into the `RayServegRPCContext` it
    sends the replica, but not the deadline, so this wraps that copy to add
    `sdserve_deadline` (seconds since the epoch, or None). It runs in the proxy's process."""
    from ray.serve import grpc_util

    from sdserve.v1.diffusion_pb2_grpc import add_DiffusionServiceServicer_to_server

    original = grpc_util.RayServegRPCContext.__init__
    if not getattr(original, "sdserve_deadline", False):

        def __init__(self, grpc_context):
            original(self, grpc_context)
            self.sdserve_deadline = _deadline_of(grpc_context)

        __init__.sdserve_deadline = True
        grpc_util.RayServegRPCContext.__init__ = __init__
    add_DiffusionServiceServicer_to_server(servicer, server)


def from_serve_proxy(grpc_context) -> bool:
    """Whether the call came through Serve's gRPC proxy (Serve's context object), rather than
    through sdserve's own front door (a grpc.aio context)."""
    from ray.serve.grpc_util import RayServegRPCContext

    return isinstance(grpc_context, RayServegRPCContext)


def _deadline_of(grpc_context) -> float | None:
    """A live gRPC call's deadline in seconds since the epoch (None: the client set none; grpc
    reports that as a remaining time of centuries)."""
    remaining = grpc_context.time_remaining()
    has_deadline = remaining is not None and remaining < 10 * 365 * 86400
    return time.time() + remaining if has_deadline else None


def request_deadline(grpc_context) -> float | None:
    """The client's deadline (seconds since the epoch), or None: the call's own on the front
    door (a grpc.aio context), or what `add_diffusion_service` captured in Serve's proxy."""
    if not from_serve_proxy(grpc_context):
        return _deadline_of(grpc_context)
    return getattr(grpc_context, "sdserve_deadline", None)


def app_deployments(app: Application, app_name: str = "sdserve") -> dict[str, Deployment]:
    """Every deployment `app` binds, by name, as Serve builds them at deploy time (each bound
    deployment nested in another's arguments replaced by its handle); needs no running Ray.
    What tests and tools read an application graph with."""
    from ray.serve._private.build_app import build_app

    return {d.name: d for d in build_app(app, name=app_name).deployments}
