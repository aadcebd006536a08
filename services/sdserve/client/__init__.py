"""The Python client of sdserve's gRPC API (DiffusionService): no protobuf in sight.

    from sdserve.client import Client

    with Client("127.0.0.1:9000") as client:
        result = client.generate("a red circle on a blue background", steps=25, seed=42)
        result.images[0].save("circle.png")

`Client` blocks; `AsyncClient` has the same methods as coroutines (and `stream` as an async
iterator), over grpc.aio. Both build their requests and convert their replies with the same code
(`_calls.py`); the results are the frozen dataclasses of `types.py`. A failed RPC raises
`ClientError`, whose str is "CODE: message".
"""

from sdserve.client._aio import AsyncClient
from sdserve.client._calls import API_KEY_VARIABLE, OPTIONS, TLS_VARIABLES, channel_credentials
from sdserve.client._sync import Client
from sdserve.client.admin import AdminModel, ModelAdded, ModelRemoved
from sdserve.client.types import (
    ClientError,
    Control,
    ControlNetInfo,
    Event,
    GeneratedImage,
    GenerateResult,
    Job,
    LoraInfo,
    ModelInfo,
    ModelStage,
    Parameters,
    Preview,
    Progress,
    Queued,
    Submitted,
    Timings,
)

__all__ = [
    "API_KEY_VARIABLE",
    "OPTIONS",
    "TLS_VARIABLES",
    "channel_credentials",
    "AsyncClient",
    "Client",
    "ClientError",
    "Event",
    "GenerateResult",
    "GeneratedImage",
    "Job",
    "LoraInfo",
    "Control",
    "ControlNetInfo",
    "ModelInfo",
    "ModelStage",
    "Parameters",
    "Preview",
    "Progress",
    "Queued",
    "Submitted",
    "Timings",
    "AdminModel",
    "ModelAdded",
    "ModelRemoved",
]
