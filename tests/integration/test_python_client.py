"""sdserve.client against the session's server: the same images as the stubs, every stream
event, cancelling by leaving a stream, asyncio, jobs, models and errors as ClientError."""

from __future__ import annotations

import asyncio
import time
from contextlib import aclosing

import grpc
import pytest
from helpers import API_KEYS
from PIL import Image

from sdserve.client import (
    AsyncClient,
    Client,
    ClientError,
    GenerateResult,
    Job,
    Preview,
    Progress,
    Queued,
)
from sdserve.v1 import diffusion_pb2

pytestmark = pytest.mark.integration

KEY = API_KEYS["tenant-a"]
QUICK = dict(width=32, height=32, steps=2, guidance_scale=1.0, scheduler="ddim")


@pytest.fixture(scope="module")
def client(server):
    with Client(server.target, api_key=KEY, timeout=120) as client:
        yield client


def test_generate_makes_the_stubs_images(client, stub):
    options = dict(steps=4, seed=11, scheduler="ddim", guidance_scale=5.0)
    result = client.generate("a red circle", **options)
    reply = stub.Generate(diffusion_pb2.GenerateRequest(prompt="a red circle", **options),
                          timeout=120)  # fmt: skip
    assert [im.png for im in result.images] == [im.png for im in reply.images]
    (image,) = result.images
    assert (image.seed, image.width, image.height) == (11, 64, 64)
    assert image.image.size == (64, 64) and image.image.mode == "RGB"
    p = result.parameters
    assert (p.steps, p.scheduler, p.guidance_scale, p.model) == (4, "ddim", 5.0, "default")
    assert (p.width, p.height, p.strength, p.guidance_stop, p.cache_interval) == (64, 64, 0, 1, 1)
    assert result.timings.total_s >= result.timings.denoiser_s > 0
    assert result.request_id


def test_image_inputs_from_a_path_and_a_pil_image_are_the_same(client, tmp_path):
    start = client.generate("a red circle", seed=1, **QUICK).images[0].save(tmp_path / "in.png")
    options = dict(QUICK, steps=4, seed=2, strength=0.5)
    from_path = client.generate("a green circle", init_image=start, **options)
    from_pil = client.generate("a green circle", init_image=Image.open(start), **options)
    assert from_path.images[0].png == from_pil.images[0].png
    assert from_path.parameters.strength == 0.5


def test_stream_yields_queued_progress_previews_then_the_result(client):
    events = list(client.stream("a red circle", steps=6, seed=9, scheduler="ddim", preview_every=2))
    assert isinstance(events[0], Queued) and events[0].request_id
    assert isinstance(events[-1], GenerateResult) and events[-1].images[0].seed == 9
    progress = [e for e in events if isinstance(e, Progress)]
    assert [(p.step, p.total) for p in progress] == [(k, 6) for k in range(1, 7)]
    assert all(a.elapsed_s <= b.elapsed_s for a, b in zip(progress, progress[1:], strict=False))
    previews = [(i, e) for i, e in enumerate(events) if isinstance(e, Preview)]
    assert [p.step for _, p in previews] == [2, 4, 6]
    for i, preview in previews:  # each preview follows its step's progress
        assert events[i - 1].step == preview.step
        assert [im.size for im in preview.images] == [(64, 64)]
    assert events[-1].request_id == events[0].request_id


def test_closing_a_stream_early_cancels_it(client):
    """A 150-step request left after its first step: the call is cancelled at once (the
    server frees its batch slot at the next step), and the server serves on."""
    events = client.stream("a long one", steps=150, scheduler="ddim", width=64, height=64)
    while not isinstance(next(events), Progress):
        pass
    closing = time.monotonic()
    events.close()
    assert time.monotonic() - closing < 2.0
    with pytest.raises(StopIteration):
        next(events)
    assert client.generate("after", **QUICK).images


def test_async_client_runs_four_requests_at_once(server, client):
    async def four():
        async with AsyncClient(server.target, api_key=KEY, timeout=120) as aclient:
            results = await asyncio.gather(
                *(aclient.generate("a blue square", seed=seed, **QUICK) for seed in range(4))
            )
            async with aclosing(aclient.stream("a blue square", seed=0, **QUICK)) as stream:
                last = [event async for event in stream][-1]
            return results, last

    results, streamed = asyncio.run(four())
    assert [r.images[0].seed for r in results] == [0, 1, 2, 3]
    assert len({r.request_id for r in results}) == 4
    same = client.generate("a blue square", seed=0, **QUICK)
    assert results[0].images[0].png == same.images[0].png == streamed.images[0].png


def test_submit_and_wait(client):
    submitted = client.submit("a job", priority="high", seed=5, **QUICK)
    assert submitted.created and submitted.job_id
    seen: list[Job] = []
    job = client.wait(submitted.job_id, on_progress=seen.append, timeout=120)
    assert job.state == "SUCCEEDED" and job.ended and seen[-1] == job
    assert [(im.seed, im.width) for im in job.result.images] == [(5, 32)]
    assert job.result.parameters.steps == 2 and job.attempts == 1
    again = client.job(submitted.job_id)
    assert again.state == "SUCCEEDED" and again.result.images[0].png == job.result.images[0].png
    key = f"client-{submitted.job_id}"
    first = client.submit("a job", idempotency_key=key, **QUICK)
    second = client.submit("a job", idempotency_key=key, **QUICK)
    assert second.job_id == first.job_id and first.created and not second.created


def test_cancel_and_async_wait(server, client):
    long = dict(QUICK, steps=150, width=64, height=64)
    job_id = client.submit("a long job", priority="low", **long).job_id
    assert client.cancel(job_id).job_id == job_id

    async def wait():
        states = []

        async def record(job: Job) -> None:
            states.append(job.state)

        async with AsyncClient(server.target, api_key=KEY) as aclient:
            return await aclient.wait(job_id, on_progress=record, timeout=60), states

    job, states = asyncio.run(wait())
    assert job.state == "CANCELLED" and job.result is None and states[-1] == "CANCELLED"


def test_models(client):
    models = client.models()
    assert [m.name for m in models] == ["default", "shapes", "sdxl", "sd3", "flux"]
    assert models[0].family == "sd1" and models[0].native_width == 64
    sdxl = models[2]
    assert sdxl.family == "sdxl" and not sdxl.image_inputs and not sdxl.inpainting


def test_errors_are_client_errors(server, client, monkeypatch):
    with pytest.raises(ClientError) as err:
        client.generate("a cat", width=60)
    assert err.value.code == "INVALID_ARGUMENT" and err.value.message.startswith("width: ")
    assert str(err.value).startswith("INVALID_ARGUMENT: width: must be a multiple of 8")
    assert isinstance(err.value.__cause__, grpc.RpcError)
    with pytest.raises(ClientError, match="^INVALID_ARGUMENT: steps: "):
        list(client.stream("a cat", steps=0))
    with pytest.raises(ClientError, match="^NOT_FOUND: job_id: "):
        client.job("no-such-job")

    monkeypatch.delenv("SDSERVE_API_KEY", raising=False)
    with Client(server.target) as keyless, pytest.raises(ClientError) as err:
        keyless.models()
    assert err.value.code == "UNAUTHENTICATED"
    monkeypatch.setenv("SDSERVE_API_KEY", KEY)  # a client without api_key takes it from here
    with Client(server.target) as from_env:
        assert from_env.models()[0].name == "default"
