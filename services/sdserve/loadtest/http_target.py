"""The load tester's HTTP mode: the same bounded loads (`sdserve.loadtest.drive`) against the
OpenAI-compatible HTTP API instead of gRPC (`sdserve loadtest --http URL`)."""

from __future__ import annotations

from sdserve.loadtest.drive import SendError, drive
from sdserve.loadtest.report import Report
from sdserve.v1 import diffusion_pb2


async def run_http_loadtest(
    url: str,
    *,
    timeout_s: float = 600.0,
    metadata: tuple[tuple[str, str], ...] = (),
    **kwargs,
) -> Report:
    """`drive` against the OpenAI-compatible HTTP API at `url` (`http://HOST:8000`): each
    request as `POST /v1/images/generations` with `response_format: b64_json`; `metadata`'s
    authorization goes as the Authorization header."""
    import httpx

    from sdserve.http.openai_images import generation_body

    headers = {k: v for k, v in metadata if k == "authorization"}
    clients = kwargs.get("concurrency") or 100
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=timeout_s,
                                 limits=limits) as http:  # fmt: skip

        async def send(request: diffusion_pb2.GenerateRequest) -> int:
            body = {**generation_body(request), "response_format": "b64_json"}
            reply = await http.post("/v1/images/generations", json=body)
            if reply.status_code != 200:
                try:
                    code = reply.json()["error"]["code"].upper()
                except (ValueError, KeyError, TypeError, AttributeError):
                    code = f"HTTP_{reply.status_code}"
                raise SendError(code)
            return len(reply.json()["data"])

        return await drive(send, **kwargs)
