"""The OpenAI-compatible HTTP API through Serve's HTTP proxy, spoken to with the official `openai`
package (issue 18): the same images as the gRPC API, streamed partial images, URLs that
download, OpenAI's error shapes, API keys."""

from __future__ import annotations

import base64
import io

import httpx
import numpy as np
import openai
import pytest
from helpers import API_KEYS
from PIL import Image

from sdserve.v1 import diffusion_pb2

pytestmark = pytest.mark.integration

KEY = API_KEYS["tenant-a"]


@pytest.fixture(scope="module")
def base_url(server) -> str:
    return f"http://127.0.0.1:{server.config.server.http_port}"


@pytest.fixture(scope="module")
def client(base_url) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{base_url}/v1", api_key=KEY, max_retries=0, timeout=120)


def _pixels(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"), dtype=np.int16)


def test_generate_returns_the_grpc_apis_png(client, stub):
    reply = client.images.generate(
        model="default", prompt="a red fox", size="64x64", response_format="b64_json",
        extra_body={"seed": 11, "num_inference_steps": 5, "scheduler": "ddim"},
    )  # fmt: skip
    png = base64.b64decode(reply.data[0].b64_json)
    grpc_reply = stub.Generate(
        diffusion_pb2.GenerateRequest(prompt="a red fox", width=64, height=64, seed=11, steps=5,
                                      scheduler="ddim", model="default"),
        timeout=60,
    )  # fmt: skip
    assert png == grpc_reply.images[0].png  # the same pixels and the same PNG text
    assert reply.data[0].revised_prompt == "a red fox"


def test_several_images_and_the_sdxl_model(client):
    reply = client.images.generate(model="sdxl", prompt="a hill", n=2, size="64x64",
                                   extra_body={"num_inference_steps": 3})  # fmt: skip
    images = [Image.open(io.BytesIO(base64.b64decode(d.b64_json))) for d in reply.data]
    assert [i.size for i in images] == [(64, 64)] * 2
    assert all("Model: sdxl" in i.text["parameters"] for i in images)


def test_streaming_yields_partial_images_then_the_completed_one(client):
    events = list(client.images.generate(
        model="default", prompt="a boat", size="64x64", stream=True, partial_images=2,
        extra_body={"seed": 2, "num_inference_steps": 9},
    ))  # fmt: skip
    kinds = [e.type for e in events]
    assert kinds[-1] == "image_generation.completed"
    partial = [e for e in events if e.type == "image_generation.partial_image"]
    assert 1 <= len(partial) <= 2
    assert [e.partial_image_index for e in partial] == list(range(len(partial)))
    final = base64.b64decode(events[-1].b64_json)
    assert Image.open(io.BytesIO(final)).size == (64, 64)


def test_url_responses_download(client, base_url):
    fields = dict(model="default", prompt="a kite", size="64x64",
                  extra_body={"seed": 4, "num_inference_steps": 3})  # fmt: skip
    by_url = client.images.generate(response_format="url", **fields)
    url = by_url.data[0].url
    assert url.startswith(f"{base_url}/v1/images/") and url.endswith("/0.png")
    downloaded = httpx.get(url, timeout=30)
    assert downloaded.status_code == 200 and downloaded.headers["content-type"] == "image/png"
    inline = client.images.generate(response_format="b64_json", **fields)
    assert downloaded.content == base64.b64decode(inline.data[0].b64_json)
    missing = httpx.get(url.replace("/0.png", "/5.png"), timeout=30)
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "not_found"


def test_a_bad_size_is_400_in_openais_error_shape(client, base_url):
    with pytest.raises(openai.BadRequestError) as err:
        client.images.generate(model="default", prompt="x", size="100x100")
    assert err.value.status_code == 400
    assert err.value.body["param"] == "size" and err.value.body["type"] == "invalid_request_error"
    raw = httpx.post(f"{base_url}/v1/images/generations", json={"prompt": "x", "size": "big"},
                     headers={"authorization": f"Bearer {KEY}"}, timeout=30)  # fmt: skip
    assert raw.status_code == 400
    assert set(raw.json()["error"]) == {"message", "type", "param", "code"}


def test_a_missing_or_wrong_key_is_401(base_url):
    no_key = httpx.post(f"{base_url}/v1/images/generations", json={"prompt": "x"}, timeout=30)
    assert no_key.status_code == 401
    assert no_key.json()["error"]["type"] == "authentication_error"
    wrong = openai.OpenAI(base_url=f"{base_url}/v1", api_key="sk-wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        wrong.images.generate(prompt="x", size="64x64")


def test_models_and_health(client, base_url):
    served = ["default", "shapes", "sdxl", "sd3", "flux"]
    assert [m.id for m in client.models.list()] == served
    health = httpx.get(f"{base_url}/healthz", timeout=30)
    assert health.status_code == 200 and health.json()["models"] == served
