"""The one error interceptor: exceptions -> gRPC status codes, and the per-RPC metrics (the
HTTP API maps the same codes to HTTP statuses: `status_name`).

Ray Serve's gRPC proxy takes no server interceptors, so every public RPC method of the ingress
is wrapped with `@grpc_errors(ResponseType)`, which works the same on both front doors. On
sdserve's own (`serve/front_door.py`, a `grpc.aio` server) it aborts the call with the status;
on Serve's proxy it sets the status on Serve's `grpc_context` and returns an empty response
(unary) or raises `StatusSet` (streaming), which the proxy turns into the client's status. It
gives each call a request id when the front door gave none (Serve's proxy does). It records
every call's method, final status code and duration
(`sdserve.stats.RpcDone`) into the `stats` attribute of the deployment it decorates.
"""

from __future__ import annotations

import functools
import inspect
import logging
import math
import time
import uuid
from collections.abc import Callable

import grpc

from sdserve.errors import SdserveError
from sdserve.serve import _ray
from sdserve.stats import RpcDone

# Serve's logger: its lines carry the replica and the request id, and land in Serve's logs.
logger = logging.getLogger("ray.serve")


class StatusSet(Exception):
    """Raised after the status was set on the grpc_context (streaming RPCs only)."""


def status_for(exc: BaseException, request_id: str = "") -> tuple[grpc.StatusCode, str]:
    """The gRPC status code and message a client sees for `exc`."""
    if isinstance(exc, SdserveError):
        return grpc.StatusCode[exc.code], str(exc)
    from ray.exceptions import RayActorError
    from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError

    if isinstance(exc, BackPressureError):
        return grpc.StatusCode.RESOURCE_EXHAUSTED, "the server is at capacity; retry later"
    if isinstance(exc, DeploymentUnavailableError):
        return grpc.StatusCode.UNAVAILABLE, f"a stage is unavailable: {exc}"
    if isinstance(exc, RayActorError):  # the stage replica died or is unreachable mid-call
        return grpc.StatusCode.UNAVAILABLE, (
            f"a stage replica was lost during the request ({type(exc).__name__}); retry"
        )
    return (
        grpc.StatusCode.INTERNAL,
        f"internal error ({type(exc).__name__}); look for request {request_id} in the server logs",
    )


def status_name(exc: BaseException, request_id: str = "") -> tuple[str, str]:
    """`status_for` with the code's name ("INVALID_ARGUMENT"): what the HTTP API maps to an
    HTTP status, so that both APIs answer one error alike."""
    code, message = status_for(exc, request_id)
    return code.name, message


def grpc_errors(response_type: type) -> Callable:
    """Decorates an async RPC method `(self, request, grpc_context)` of the ingress."""

    def decorate(method: Callable) -> Callable:
        rpc = method.__name__

        def _record(self, code: grpc.StatusCode, started: float) -> None:
            self.stats.record(RpcDone(rpc, code.name, time.perf_counter() - started))

        if inspect.isasyncgenfunction(method):  # server-streaming RPC

            @functools.wraps(method)
            async def stream_wrapper(self, request, grpc_context):
                _ensure_request_id()
                started = time.perf_counter()
                code = grpc.StatusCode.CANCELLED  # unless it ends otherwise
                try:
                    async for item in method(self, request, grpc_context):
                        yield item
                    code = grpc.StatusCode.OK
                    return
                except Exception as exc:  # every error becomes a status; the server keeps serving
                    code, message, trailing = _status(exc)
                    failed = exc
                finally:
                    _record(self, code, started)
                await _send_status(grpc_context, code, message, trailing)
                # A stream must raise for Serve's proxy to send the status set above.
                raise StatusSet(message) from failed

            return stream_wrapper

        @functools.wraps(method)
        async def wrapper(self, request, grpc_context):
            _ensure_request_id()
            started = time.perf_counter()
            code = grpc.StatusCode.CANCELLED  # unless it ends otherwise
            try:
                reply = await method(self, request, grpc_context)
                code = grpc.StatusCode.OK
                return reply
            except Exception as exc:  # every error becomes a status; the server keeps serving
                code, message, trailing = _status(exc)
            finally:
                _record(self, code, started)
            await _send_status(grpc_context, code, message, trailing)
            return response_type()  # Serve's proxy sends the status set above instead

        return wrapper

    return decorate


def _ensure_request_id() -> None:
    """Gives the call a request id (the front door's calls have none; Serve's proxy sets one),
    which the log lines of this replica and of the stages it calls carry."""
    if not _ray.current_request_id():
        _ray.set_request_id(uuid.uuid4().hex)


def _status(exc: BaseException) -> tuple[grpc.StatusCode, str, tuple]:
    """Logs `exc`; its status code, message and trailing metadata (load shedding's and the
    tenant limits' `retry-after-s` hint, for clients that back off)."""
    request_id = _ray.current_request_id()
    code, message = status_for(exc, request_id)
    if code == grpc.StatusCode.INTERNAL:
        logger.exception("request %s failed", request_id, exc_info=exc)
    else:
        logger.info("request %s: %s %s", request_id, code.name, message)
    retry_after = getattr(exc, "retry_after_s", None)
    # rounded up: a hint of 0.04 s must not read "0.0"
    hint = f"{math.ceil(retry_after * 10) / 10:.1f}" if retry_after is not None else None
    trailing = () if hint is None else (("retry-after-s", hint),)
    return code, message, trailing


async def _send_status(grpc_context, code: grpc.StatusCode, message: str, trailing: tuple) -> None:
    """Ends the call with the status: aborts it on the own front door (raises); sets it on
    Serve's proxy context, which sends it when the method returns or raises."""
    if not _ray.from_serve_proxy(grpc_context):
        await grpc_context.abort(code, message, trailing)
    grpc_context.set_code(code)
    grpc_context.set_details(message)
    grpc_context.set_trailing_metadata(trailing)
