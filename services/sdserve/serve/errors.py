"""The one error interceptor: exceptions -> gRPC status codes, and the per-RPC metrics (the
HTTP API maps the same codes to HTTP statuses: `status_name`).

Ray Serve's gRPC proxy takes no server interceptors, so every public RPC method of the ingress
is wrapped with `@grpc_errors(ResponseType)`. It sets the status on Serve's `grpc_context` and
returns an empty response (unary) or raises `StatusSet` (streaming), which the proxy turns into
the client's error status. It records every call's method, final status code and duration
(`sdserve.stats.RpcDone`) into the `stats` attribute of the deployment it decorates.
"""

from __future__ import annotations

import functools
import inspect
import logging
import time
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
    from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError

    if isinstance(exc, BackPressureError):
        return grpc.StatusCode.RESOURCE_EXHAUSTED, "the server is at capacity; retry later"
    if isinstance(exc, DeploymentUnavailableError):
        return grpc.StatusCode.UNAVAILABLE, f"a stage is unavailable: {exc}"
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

        def _fail(self, exc: BaseException, grpc_context) -> grpc.StatusCode:
            request_id = _ray.current_request_id()
            code, message = status_for(exc, request_id)
            if code == grpc.StatusCode.INTERNAL:
                logger.exception("request %s failed", request_id)
            else:
                logger.info("request %s: %s %s", request_id, code.name, message)
            grpc_context.set_code(code)
            grpc_context.set_details(message)
            retry_after = getattr(exc, "retry_after_s", None)
            if retry_after is not None:  # load shedding's hint, for clients that back off
                trailing = [
                    *grpc_context.trailing_metadata(),
                    ("retry-after-s", f"{retry_after:.1f}"),
                ]
                grpc_context.set_trailing_metadata(trailing)
            return code

        if inspect.isasyncgenfunction(method):  # server-streaming RPC

            @functools.wraps(method)
            async def stream_wrapper(self, request, grpc_context):
                started = time.perf_counter()
                code = grpc.StatusCode.CANCELLED  # unless it ends otherwise
                try:
                    async for item in method(self, request, grpc_context):
                        yield item
                    code = grpc.StatusCode.OK
                except Exception as exc:  # every error becomes a status; the server keeps serving
                    code = _fail(self, exc, grpc_context)
                    # A stream must raise for Serve's proxy to send the status set above.
                    raise StatusSet(grpc_context.details()) from exc
                finally:
                    _record(self, code, started)

            return stream_wrapper

        @functools.wraps(method)
        async def wrapper(self, request, grpc_context):
            started = time.perf_counter()
            code = grpc.StatusCode.CANCELLED  # unless it ends otherwise
            try:
                reply = await method(self, request, grpc_context)
                code = grpc.StatusCode.OK
                return reply
            except Exception as exc:  # every error becomes a status; the server keeps serving
                code = _fail(self, exc, grpc_context)
                return response_type()
            finally:
                _record(self, code, started)

        return wrapper

    return decorate
