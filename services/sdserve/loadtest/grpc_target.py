"""The load tester's gRPC mode: `drive` against DiffusionService.Generate."""

from __future__ import annotations

import grpc

from sdserve.loadtest.drive import drive
from sdserve.loadtest.report import Report
from sdserve.v1 import diffusion_pb2, diffusion_pb2_grpc


async def run_loadtest(
    target: str,
    *,
    timeout_s: float = 600.0,
    application: str = "",
    metadata: tuple[tuple[str, str], ...] = (),
    credentials: grpc.ChannelCredentials | None = None,
    **kwargs,
) -> Report:
    """`drive` against DiffusionService.Generate at `target` (keyword arguments as `drive`).
    `application` names the Serve application when the proxy serves several; `metadata` goes
    with every call (an API key); `credentials`: TLS (None: plaintext)."""
    metadata = (*metadata, *((("application", application),) if application else ())) or None
    # A channel per 50 clients, as separate clients would have: one HTTP/2 connection for
    # hundreds of calls throttled them in the client (measured: the server then idled).
    clients = kwargs.get("concurrency") or 50
    channels = [
        grpc.aio.secure_channel(target, credentials) if credentials
        else grpc.aio.insecure_channel(target)
        for _ in range(max(1, (clients + 49) // 50))
    ]  # fmt: skip
    stubs = [diffusion_pb2_grpc.DiffusionServiceStub(c) for c in channels]
    try:

        async def send(request: diffusion_pb2.GenerateRequest) -> int:
            stub = stubs[request.seed % len(stubs)]
            reply = await stub.Generate(request, timeout=timeout_s, metadata=metadata)
            return len(reply.images)

        return await drive(send, **kwargs)
    finally:
        for channel in channels:
            await channel.close()
