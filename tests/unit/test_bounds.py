"""Bounds on what a client can make the server hold (issue 27): the HTTP body, base64 and raw
image inputs, the job queue's Redis connections, and image decoding kept off the event loop."""

from __future__ import annotations

import asyncio
import json
import threading
import time
import uuid
from types import SimpleNamespace

import pytest
from starlette.requests import Request

from sdserve.api import validate
from sdserve.api.types import GenerateFields
from sdserve.config import DefaultsConfig, LimitsConfig, SdserveConfig
from sdserve.errors import InvalidArgument, Unavailable
from sdserve.http import openai_images as oai
from sdserve.http.app import HttpApi
from sdserve.jobs.queue import JobQueue

MiB = 2**20
LIMITS = LimitsConfig()
CAP = 12 * MiB
"""`limits.max_image_bytes` by default."""


def _post(total: int, headers: dict[str, str], chunk: int = MiB):
    """A POST /v1/images/generations of `total` bytes, sent `chunk` at a time, and a list
    holding how many bytes the app has read so far."""
    read = [0]
    piece = b"x" * chunk

    async def receive():
        size = min(chunk, total - read[0])
        read[0] += size
        return {"type": "http.request", "body": piece[:size], "more_body": read[0] < total}

    scope = {"type": "http", "method": "POST", "path": "/v1/images/generations",
             "headers": [(k.encode(), v.encode()) for k, v in headers.items()],
             "query_string": b"", "scheme": "http", "server": ("testserver", 80),
             "root_path": ""}  # fmt: skip
    return Request(scope, receive), read


@pytest.mark.parametrize("declared", [True, False], ids=["content-length", "chunked"])
def test_a_40_mib_body_is_refused_413_without_being_read_whole(declared):
    """Over `http.max_body_bytes`, the API answers 413 with OpenAI's error JSON: at once when
    Content-Length says so, else as soon as what was read passes the limit."""
    total = 40 * MiB
    headers = {"content-type": "application/json"}
    if declared:
        headers["content-length"] = str(total)
    request, read = _post(total, headers)
    api = HttpApi(SimpleNamespace(config=SdserveConfig()))
    reply = asyncio.run(api.handle(request))
    assert reply.status_code == 413
    error = json.loads(reply.body)["error"]
    assert "http.max_body_bytes" in error["message"] and error["param"] == "body"
    limit = SdserveConfig().http.max_body_bytes
    assert read[0] == 0 if declared else limit <= read[0] <= limit + MiB


def test_an_oversized_base64_image_is_refused_before_it_is_decoded(monkeypatch):
    """A base64 image longer than `limits.max_image_bytes` encodes to is INVALID_ARGUMENT
    naming its field, and is never decoded."""

    def decode(*args, **kwargs):
        raise AssertionError("an oversized image was decoded")

    monkeypatch.setattr(oai.base64, "b64decode", decode)
    encoded = "A" * (4 * (CAP // 3) + 8)
    for field in ("init_image", "mask_image"):
        with pytest.raises(InvalidArgument) as err:
            oai.parse_generation({"prompt": "x", field: f"data:image/png;base64,{encoded}"})
        assert err.value.field == field and "limits.max_image_bytes" in str(err.value)
    assert LimitsConfig().max_image_bytes == CAP


def test_an_oversized_raw_image_is_refused_before_it_is_decoded(monkeypatch):
    """The same cap on the raw bytes of a gRPC request's (or a job's) image: refused before
    PIL sees it."""
    opened = []
    monkeypatch.setattr(validate, "_image_size", lambda *args: opened.append(args) or (64, 64))
    fields = GenerateFields(prompt="x", init_image=b"\x89PNG" + bytes(CAP))
    with pytest.raises(InvalidArgument) as err:
        validate.validate_fields(fields, limits=LIMITS, defaults=DefaultsConfig(),
                                 native_size=(64, 64))  # fmt: skip
    assert err.value.field == "init_image" and "limits.max_image_bytes" in str(err.value)
    assert opened == []


def test_image_inputs_are_decoded_off_the_event_loop(monkeypatch):
    """The async validation decodes image inputs on a worker thread: a large PNG does not
    stall every other request on the ingress's event loop."""
    threads = []

    def image_size(*args):
        threads.append(threading.current_thread())
        return 64, 64

    monkeypatch.setattr(validate, "_image_size", image_size)
    fields = GenerateFields(prompt="x", init_image=b"png", mask_image=b"png")
    params = asyncio.run(validate.validate_fields_async(
        fields, limits=LIMITS, defaults=DefaultsConfig(), native_size=(64, 64)))  # fmt: skip
    assert (params.width, params.height) == (64, 64)
    assert len(threads) == 2 and threading.main_thread() not in threads


def test_redis_pool_exhaustion_is_unavailable_not_a_hang(redis_server):
    """With `jobs.max_connections` = 2, two blocking reads (watchers, running jobs) take the
    whole pool: a third call answers UNAVAILABLE after the pool's wait instead of hanging."""

    async def main():
        queue = JobQueue(redis_server.url, key_prefix=f"t{uuid.uuid4().hex[:8]}:",
                         max_connections=2, connection_wait_s=0.2)  # fmt: skip
        blocked = [asyncio.create_task(queue.wait_for_cancel(f"job{i}")) for i in range(2)]
        await asyncio.sleep(0.1)  # both are in their blocking XREAD now
        started = time.monotonic()
        with pytest.raises(Unavailable, match="jobs.max_connections"):
            await asyncio.wait_for(queue.wait_for_cancel("job2"), timeout=3)
        waited = time.monotonic() - started
        for task in blocked:
            task.cancel()
        await asyncio.gather(*blocked, return_exceptions=True)
        await queue.close()
        return waited

    assert asyncio.run(main()) < 1.0
