"""Errors that reach clients. Each names the gRPC status code it maps to.

Code anywhere below the edges raises these; the one error interceptor
(`sdserve.serve.errors.grpc_errors`) turns them into gRPC statuses. This module imports no grpc,
so the pipeline layer can raise them too.
"""

from __future__ import annotations


class SdserveError(Exception):
    """Base class. `code` is the name of a `grpc.StatusCode` member."""

    code = "INTERNAL"


class InvalidArgument(SdserveError):
    """A request field is invalid; the message starts with the field's name."""

    code = "INVALID_ARGUMENT"

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field
        self.reason = message


class ModelFolderError(SdserveError, ValueError):
    """A model folder is missing something a stage needs."""

    code = "FAILED_PRECONDITION"


class NotFound(SdserveError):
    """The named thing (a job, a health-checked service) does not exist."""

    code = "NOT_FOUND"


class DeadlineExceeded(SdserveError):
    """A request was dropped because it was cancelled or ran past its deadline."""

    code = "DEADLINE_EXCEEDED"


class Internal(SdserveError):
    """A bug or an unexpected failure; the message says where to look."""

    code = "INTERNAL"


class ResourceExhausted(SdserveError):
    """A queue or limit is full; retrying later can succeed."""

    code = "RESOURCE_EXHAUSTED"


class Unavailable(SdserveError):
    """Something the call needs (Redis, a stage) does not answer; retrying later can succeed."""

    code = "UNAVAILABLE"


class Unauthenticated(SdserveError):
    """The call carries no API key, or one the server does not know."""

    code = "UNAUTHENTICATED"


class PermissionDenied(SdserveError):
    """The caller is known but may not do this (an admin call without the admin role, a
    callback URL off the allow-list); the message names what is refused."""

    code = "PERMISSION_DENIED"


class FailedPrecondition(SdserveError):
    """The server cannot do it as it stands (a broken adapter file)."""

    code = "FAILED_PRECONDITION"
