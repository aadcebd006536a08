"""The OpenAI-compatible HTTP API (`sdserve.http.app`) over the in-process request path, driven
by the official `openai` package (through Starlette's test client, no sockets) and by plain
HTTP for what the package does not show: status codes, error shapes, server-sent events."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import re

import numpy as np
import pytest
from PIL import Image
from starlette.applications import Starlette
from starlette.routing import Route
from starlette.testclient import TestClient

from sdserve.api.auth import ApiKeys
from sdserve.api.types import GenerateFields, Result
from sdserve.errors import InvalidArgument, ResourceExhausted
from sdserve.http import openai_images as oai
from sdserve.http.app import HttpApi
from sdserve.v1 import diffusion_pb2

KEY = "sk-test-0123456789abcdef"


def _client(api: HttpApi) -> TestClient:
    async def endpoint(request):
        return await api.handle(request, "req-test")

    app = Starlette(routes=[Route("/{path:path}", endpoint, methods=["GET", "POST"])])
    return TestClient(app)


@pytest.fixture(scope="module")
def http(in_process_path):
    return _client(HttpApi(in_process_path))


def _pixels(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"), dtype=np.int16)


async def _grpc_png(path, **fields) -> bytes:
    params = await path.validate(GenerateFields(**fields))
    return [e async for e in path.run(params) if isinstance(e, Result)][0].pngs[0]


def test_the_openai_package_gets_the_grpc_apis_image(http, in_process_path):
    import asyncio

    from openai import OpenAI

    client = OpenAI(base_url="http://testserver/v1", api_key="unused", http_client=http)
    reply = client.images.generate(
        model="default", prompt="a cat", size="64x64", response_format="b64_json",
        extra_body={"seed": 7, "num_inference_steps": 4},
    )  # fmt: skip
    png = base64.b64decode(reply.data[0].b64_json)
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    assert reply.data[0].revised_prompt == "a cat"
    same = asyncio.run(_grpc_png(in_process_path, prompt="a cat", seed=7, steps=4, width=64,
                                 height=64, model="default"))  # fmt: skip
    assert np.array_equal(_pixels(png), _pixels(same))


def test_streaming_sends_partial_images_then_the_completed_one(http):
    from openai import OpenAI

    client = OpenAI(base_url="http://testserver/v1", api_key="unused", http_client=http)
    events = list(client.images.generate(
        prompt="a dog", size="64x64", stream=True, partial_images=2,
        extra_body={"seed": 3, "num_inference_steps": 9},
    ))  # fmt: skip
    kinds = [e.type for e in events]
    assert kinds == ["image_generation.partial_image"] * 2 + ["image_generation.completed"]
    assert [e.partial_image_index for e in events[:2]] == [0, 1]
    for event in events:
        assert Image.open(io.BytesIO(base64.b64decode(event.b64_json))).size == (64, 64)
        assert event.size == "64x64"


def _sse(text: str) -> list[tuple[str | None, str]]:
    """(event, data) of each event in a `text/event-stream` body, read as the SSE standard says:
    lines end in CRLF, LF or CR; a line starting with ':' is a comment; a blank line ends an
    event."""
    events, name, data = [], None, []
    for line in re.split(r"\r\n|\r|\n", text):
        if not line:
            if name is not None or data:
                events.append((name, "\n".join(data)))
            name, data = None, []
        elif not line.startswith(":"):
            field, _, value = line.partition(":")
            value = value[1:] if value.startswith(" ") else value
            if field == "event":
                name = value
            elif field == "data":
                data.append(value)
    return events


def test_the_stream_on_the_wire_is_named_events_with_json_data(http):
    body = {"prompt": "a dog", "size": "64x64", "stream": True, "partial_images": 1,
            "num_inference_steps": 4}  # fmt: skip
    reply = http.post("/v1/images/generations", json=body)
    assert reply.status_code == 200
    assert reply.headers["content-type"].startswith("text/event-stream")
    events = _sse(reply.text)
    assert [name for name, _ in events] == ["image_generation.partial_image",
                                            "image_generation.completed"]  # fmt: skip
    for name, data in events:
        assert json.loads(data)["type"] == name


def test_stream_progress_sends_each_step_and_the_completed_event_its_seed(http):
    body = {"prompt": "a dog", "size": "64x64", "stream": True, "partial_images": 1, "seed": 11,
            "num_inference_steps": 4, "stream_progress": True}  # fmt: skip
    events = [(name, json.loads(data)) for name, data in _sse(http.post(
        "/v1/images/generations", json=body).text)]  # fmt: skip
    steps = [(e["step"], e["total_steps"]) for name, e in events
             if name == "image_generation.progress"]  # fmt: skip
    assert steps == [(1, 4), (2, 4), (3, 4), (4, 4)]
    name, completed = events[-1]
    assert name == "image_generation.completed" and completed["seed"] == 11
    assert completed["request_id"] == "req-test"
    refused = http.post("/v1/images/generations", json={**body, "stream_progress": 1})
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "stream_progress"


class _SlowStart:
    """The request path, starting each run after 50 ms (time for keep-alive pings)."""

    def __init__(self, path):
        self._path = path

    def __getattr__(self, name):
        return getattr(self._path, name)

    async def run(self, *args, **kwargs):
        await asyncio.sleep(0.05)
        async for event in self._path.run(*args, **kwargs):
            yield event


def test_keep_alive_pings_are_comments_that_clients_skip(in_process_path):
    from openai import OpenAI

    api = HttpApi(_SlowStart(in_process_path))
    api.ping_s = 0.005
    http = _client(api)
    body = {"prompt": "a dog", "size": "64x64", "stream": True, "num_inference_steps": 2}
    text = http.post("/v1/images/generations", json=body).text
    assert re.search(r"^: ping", text, re.MULTILINE), text[:200]
    assert [name for name, _ in _sse(text)] == ["image_generation.completed"]
    client = OpenAI(base_url="http://testserver/v1", api_key="unused", http_client=http)
    events = list(client.images.generate(prompt="a dog", size="64x64", stream=True,
                                         extra_body={"num_inference_steps": 2}))  # fmt: skip
    assert [e.type for e in events] == ["image_generation.completed"]


def test_an_error_after_the_stream_started_is_an_error_event(in_process_path):
    from openai import APIError, OpenAI

    def full(params, deadline, tenant):
        raise ResourceExhausted("the queue is full")

    http = _client(HttpApi(in_process_path, admitted=full))
    body = {"prompt": "x", "size": "64x64", "stream": True, "num_inference_steps": 2}
    reply = http.post("/v1/images/generations", json=body)
    assert reply.status_code == 200  # the stream had started
    [(name, data)] = _sse(reply.text)
    assert name == "error"
    error = json.loads(data)["error"]
    assert error["code"] == "resource_exhausted" and error["type"] == "rate_limit_error"
    assert error["message"] == "the queue is full"
    client = OpenAI(base_url="http://testserver/v1", api_key="unused", http_client=http)
    with pytest.raises(APIError, match="the queue is full"):
        list(client.images.generate(prompt="x", size="64x64", stream=True))


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"prompt": "x", "size": "64by64"}, "size"),
        ({"prompt": "x", "size": "60x64"}, "size"),
        ({"prompt": "x", "n": 0}, "n"),
        ({"prompt": "x", "model": "sd99"}, "model"),
        ({"prompt": "x", "response_format": "gif"}, "response_format"),
        ({"prompt": "x", "colour": "red"}, "colour"),
        ({"prompt": "x", "stream": True, "n": 2}, "n"),
        ({"prompt": "x", "partial_images": 4}, "partial_images"),
        ({"prompt": "x", "num_inference_steps": "many"}, "num_inference_steps"),
        ({"size": "64x64"}, "prompt"),
    ],
)
def test_bad_requests_get_400_in_openais_error_shape(http, body, param):
    reply = http.post("/v1/images/generations", json=body)
    assert reply.status_code == 400, reply.text
    error = reply.json()["error"]
    assert error["type"] == "invalid_request_error"
    assert error["param"] == param and error["code"] == "invalid_argument"
    assert error["message"]


def test_not_json_unknown_routes_and_the_openai_packages_errors(http):
    assert http.post("/v1/images/generations", content=b"{nope").status_code == 400
    reply = http.get("/v1/nothing")
    assert reply.status_code == 404 and reply.json()["error"]["code"] == "not_found"
    from openai import BadRequestError, OpenAI

    client = OpenAI(base_url="http://testserver/v1", api_key="unused", http_client=http)
    with pytest.raises(BadRequestError) as err:
        client.images.generate(prompt="x", size="1x1")
    assert err.value.status_code == 400 and err.value.body["param"] == "size"


def test_keys_are_required_when_configured(in_process_path, tmp_path):
    keys = tmp_path / "keys.txt"
    keys.write_text(f"{KEY} team-a\n")
    http = _client(HttpApi(in_process_path, keys=ApiKeys.load(keys)))
    body = {"prompt": "x", "size": "64x64", "num_inference_steps": 2}
    reply = http.post("/v1/images/generations", json=body)
    assert reply.status_code == 401
    assert reply.json()["error"]["type"] == "authentication_error"
    wrong = http.post("/v1/images/generations", json=body, headers={"authorization": "Bearer x"})
    assert wrong.status_code == 401
    ok = http.post("/v1/images/generations", json=body,
                   headers={"authorization": f"Bearer {KEY}"})  # fmt: skip
    assert ok.status_code == 200 and len(ok.json()["data"]) == 1
    assert http.get("/v1/models").status_code == 401
    assert http.get("/healthz").status_code == 200  # health needs no key


def test_models_health_and_url_without_a_store(http):
    models = http.get("/v1/models").json()
    assert models["object"] == "list"
    assert [(m["id"], m["family"]) for m in models["data"]] == [("default", "sd1")]
    assert "ddim" in models["data"][0]["schedulers"]
    assert "grain" in models["data"][0]["loras"]  # the tiny model's test adapters
    assert http.get("/healthz").json() == {"status": "ok", "models": ["default"]}
    body = {"prompt": "x", "response_format": "url", "num_inference_steps": 2}
    reply = http.post("/v1/images/generations", json=body)
    assert reply.status_code == 503 and reply.json()["error"]["code"] == "unavailable"


def test_a_draining_server_refuses_with_503(in_process_path):
    http = _client(HttpApi(in_process_path, draining=lambda: True))
    assert http.get("/healthz").status_code == 503
    assert http.post("/v1/images/generations", json={"prompt": "x"}).status_code == 503


def test_generation_body_and_parse_are_inverse():
    request = diffusion_pb2.GenerateRequest(
        prompt="a cat", negative_prompt="blur", width=96, height=64, steps=5, seed=1,
        guidance_scale=3.5, scheduler="ddim", num_images=2, model="xl", init_image=b"png",
        strength=0.5, guidance_stop=0.4, cache_interval=2,
    )  # fmt: skip
    body = oai.generation_body(request)
    assert body["size"] == "96x64" and body["num_inference_steps"] == 5
    assert json.loads(json.dumps(body)) == body
    assert oai.parse_generation(body).request == request


def test_images_as_data_urls_and_ignored_openai_fields():
    png = base64.b64encode(b"\x89PNG-bytes").decode()
    parsed = oai.parse_generation({
        "prompt": "x", "init_image": f"data:image/png;base64,{png}", "quality": "high",
        "style": "vivid", "user": "u-1", "size": "auto",
    })  # fmt: skip
    assert parsed.request.init_image == b"\x89PNG-bytes"
    assert not parsed.request.HasField("width") and parsed.user == "u-1"
    with pytest.raises(InvalidArgument) as err:
        oai.parse_generation({"prompt": "x", "mask_image": "%%%"})
    assert err.value.field == "mask_image"
