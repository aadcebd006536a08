"""sdserve.client without a server: protobuf messages built by hand become the client's types,
options become requests (unknown names refused, unset ones left unset), image inputs are taken
from bytes, paths and PIL images, errors read "CODE: message", and a stream left early cancels
its call (on stand-in stubs)."""

from __future__ import annotations

import argparse
import asyncio
import io
from contextlib import aclosing
from dataclasses import asdict

import grpc
import pytest
from PIL import Image

from sdserve.cli.options import Parents, request_options
from sdserve.client import (
    OPTIONS,
    AsyncClient,
    Client,
    ClientError,
    GenerateResult,
    Job,
    ModelInfo,
    Preview,
    Progress,
    Queued,
    Submitted,
    _calls,
)
from sdserve.client.types import event_from_pb
from sdserve.v1 import diffusion_pb2 as pb


def _png(color=(255, 0, 0), size=(16, 8)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, format="PNG")
    return buffer.getvalue()


TIMINGS = dict(text_encoder_s=0.1, vae_encoder_s=0.05, denoiser_s=0.5, vae_decoder_s=0.2,
               total_s=0.9, denoiser_queue_s=0.125, denoiser_paused_s=0.25,
               safety_checker_s=0.0625)  # fmt: skip
PARAMETERS = dict(width=16, height=8, steps=25, guidance_scale=7.5, scheduler="ddim",
                  strength=0.75, guidance_stop=0.4, cache_interval=3, model="shapes",
                  max_sequence_length=0, true_cfg_scale=1.0, shift=0.0)  # fmt: skip
"""float32 fields included: they read back as the decimals that were sent."""


def _response(n: int = 2) -> pb.GenerateResponse:
    return pb.GenerateResponse(
        images=[
            pb.Image(png=_png(), seed=7 + i, width=16, height=8, nsfw=i == 1, blocked=i == 1)
            for i in range(n)
        ],  # fmt: skip
        timings=pb.StageTimings(**TIMINGS),
        request_id="req-1",
        parameters=pb.ResolvedParameters(
            **PARAMETERS, loras=[pb.LoraWeight(name="cyan", scale=0.8)]
        ),
    )


def test_generate_result_from_pb(tmp_path):
    result = GenerateResult.from_pb(_response())
    assert result.request_id == "req-1"
    assert [(im.seed, im.width, im.height) for im in result.images] == [(7, 16, 8), (8, 16, 8)]
    assert [(im.nsfw, im.blocked) for im in result.images] == [(False, False), (True, True)]
    assert asdict(result.parameters) == {**PARAMETERS, "loras": (("cyan", 0.8),), "controls": ()}
    assert asdict(result.timings) == TIMINGS
    image = result.images[0].image
    assert image.size == (16, 8) and image.getpixel((0, 0)) == (255, 0, 0)
    path = result.images[0].save(tmp_path / "a.png")
    assert path.read_bytes() == result.images[0].png


def test_events_from_pb():
    queued = event_from_pb(pb.GenerateEvent(queued=pb.Queued(position=3, request_id="r")))
    assert queued == Queued(position=3, request_id="r")
    progress = event_from_pb(pb.GenerateEvent(progress=pb.Progress(step=2, total=6,
                                                                   elapsed_s=1.5)))  # fmt: skip
    assert progress == Progress(step=2, total=6, elapsed_s=1.5)
    preview = event_from_pb(pb.GenerateEvent(preview=pb.Preview(step=4, png=[_png(), _png()])))
    assert isinstance(preview, Preview) and preview.step == 4
    assert [im.size for im in preview.images] == [(16, 8), (16, 8)]
    result = event_from_pb(pb.GenerateEvent(result=_response(1)))
    assert isinstance(result, GenerateResult) and len(result.images) == 1
    with pytest.raises(ValueError):
        event_from_pb(pb.GenerateEvent())


def test_job_submitted_and_model_info_from_pb():
    fields = dict(job_id="j", step=3, total_steps=10, attempts=2, error="worker died",
                  created_at=100.0, started_at=101.0, cancel_requested=True,
                  worker="h:1:w", callback_url="https://hooks.example.com/x")  # fmt: skip
    attempt = pb.WebhookAttempt(at=102.0, status=503, error="HTTP 503")
    running = Job.from_pb(pb.Job(state=pb.JOB_STATE_RUNNING, priority=pb.JOB_PRIORITY_HIGH,
                                 webhook_attempts=[attempt], **fields))  # fmt: skip
    assert asdict(running) == {**fields, "state": "RUNNING", "priority": "high",
                               "finished_at": 0.0, "result": None,
                               "webhook_attempts": ((102.0, 503, "HTTP 503"),)}  # fmt: skip
    assert not running.ended
    done = Job.from_pb(pb.Job(job_id="j", state=pb.JOB_STATE_SUCCEEDED, result=_response(1)))
    assert done.ended and done.priority == "normal" and done.result.images[0].seed == 7
    for state in ("QUEUED", "FAILED", "CANCELLED"):
        assert Job.from_pb(pb.Job(state=pb.JobState.Value(f"JOB_STATE_{state}"))).state == state

    assert Submitted.from_pb(pb.SubmitJobResponse(job_id="j", created=True)) == Submitted("j", True)
    info = dict(name="sdxl", family="sdxl", native_width=1024, native_height=1024,
                prediction_type="epsilon", default_scheduler="euler", inpainting=False,
                image_inputs=False)  # fmt: skip
    assert ModelInfo.from_pb(pb.ModelInfo(**info)) == ModelInfo(**info)


def test_options_set_only_what_is_given():
    options = {"steps": 5, "seed": 0, "width": None, "guidance_scale": 0.0}
    request = _calls.generate_request("a cat", options, preview_every=2)
    assert (request.prompt, request.steps, request.seed, request.preview_every) == (
        "a cat", 5, 0, 2)  # fmt: skip
    assert request.HasField("seed") and request.HasField("guidance_scale")
    for unset in ("width", "height", "num_images", "strength", "guidance_stop", "cache_interval"):
        assert not request.HasField(unset), unset
    assert request.scheduler == "" and request.model == "" and request.init_image == b""


def test_unknown_options_raise_type_error_before_anything_is_sent():
    with pytest.raises(TypeError, match="guidance, stepz"):
        _calls.generate_request("a cat", {"stepz": 5, "guidance": 7.5, "seed": 1})
    client = Client("127.0.0.1:1")  # nothing listens there; nothing is called
    with client, pytest.raises(TypeError, match="preview_every"):
        client.generate("a cat", preview_every=2)
    with client, pytest.raises(TypeError, match="stepz"):
        client.submit("a cat", stepz=2)
    with pytest.raises(ValueError, match="priority"):
        _calls.submit("a cat", "urgent", None, {})

    async def streams() -> None:
        async with AsyncClient("127.0.0.1:1") as aclient:
            with pytest.raises(TypeError, match="stepz"):
                aclient.stream("a cat", stepz=2)

    asyncio.run(streams())


def test_image_inputs_from_bytes_path_and_pil(tmp_path):
    png = _png((0, 0, 255), (24, 16))
    (tmp_path / "in.png").write_bytes(png)
    from_bytes = _calls.generate_request("x", {"init_image": png, "mask_image": bytearray(png)})
    from_path = _calls.generate_request("x", {"init_image": str(tmp_path / "in.png"),
                                              "mask_image": tmp_path / "in.png"})  # fmt: skip
    assert from_bytes.init_image == from_path.init_image == from_path.mask_image == png
    pil = Image.new("L", (24, 16), 255)
    from_pil = _calls.generate_request("x", {"init_image": Image.open(io.BytesIO(png)),
                                             "mask_image": pil})  # fmt: skip
    decoded = Image.open(io.BytesIO(from_pil.init_image))
    assert decoded.format == "PNG" and decoded.tobytes() == Image.open(io.BytesIO(png)).tobytes()
    assert Image.open(io.BytesIO(from_pil.mask_image)).getpixel((3, 3)) == 255
    with pytest.raises(TypeError, match="init_image: expected bytes, a path or a PIL image"):
        _calls.generate_request("x", {"init_image": 42})


class _RpcError(grpc.RpcError):
    def code(self):
        return grpc.StatusCode.INVALID_ARGUMENT

    def details(self):
        return "width: must be a multiple of 8, got 60"


def test_client_error_reads_code_colon_message():
    error = ClientError("NOT_FOUND", "job_id: no job 'x'")
    assert str(error) == "NOT_FOUND: job_id: no job 'x'"
    assert (error.code, error.message) == ("NOT_FOUND", "job_id: no job 'x'")
    with pytest.raises(ClientError) as raised, _calls.rpc_errors():
        raise _RpcError()
    assert str(raised.value) == "INVALID_ARGUMENT: width: must be a multiple of 8, got 60"
    assert isinstance(raised.value.__cause__, _RpcError)


def test_call_metadata(monkeypatch):
    monkeypatch.setenv("SDSERVE_API_KEY", " env-key ")
    assert _calls.call_metadata() == (("authorization", "Bearer env-key"),)
    assert _calls.call_metadata("mine", "app") == (
        ("authorization", "Bearer mine"), ("application", "app"))  # fmt: skip
    assert _calls.call_metadata("") is None
    monkeypatch.delenv("SDSERVE_API_KEY")
    assert _calls.call_metadata(application="app") == (("application", "app"),)


class _StreamCall:
    """A stand-in for a server-streaming call (sync and grpc.aio) that records cancel()."""

    def __init__(self, events):
        self.events, self.cancelled = events, False

    def __iter__(self):
        return iter(self.events)

    async def __aiter__(self):
        for event in self.events:
            yield event

    def cancel(self):
        self.cancelled = True


class _Stub:
    def __init__(self):
        self.calls = []

    def GenerateStream(self, request, timeout, metadata):  # noqa: N802 (the stub's name)
        events = [pb.GenerateEvent(queued=pb.Queued(position=0, request_id="r"))]
        events += [pb.GenerateEvent(progress=pb.Progress(step=k, total=50)) for k in range(1, 51)]
        self.calls.append((request, timeout, metadata, _StreamCall(events)))
        return self.calls[-1][-1]


def test_leaving_a_stream_early_cancels_its_call():
    with Client("127.0.0.1:1", api_key="k", timeout=9.0) as client:
        client._stub = stub = _Stub()
        events = client.stream("a cat", steps=50, preview_every=5)
        assert [next(events), next(events)] == [Queued(0, "r"), Progress(1, 50, 0.0)]
        events.close()
        request, timeout, metadata, call = stub.calls[0]
        assert call.cancelled and (timeout, metadata) == (9.0, (("authorization", "Bearer k"),))
        assert (request.steps, request.preview_every) == (50, 5)

    async def leave_early() -> _StreamCall:
        async with AsyncClient("127.0.0.1:1", api_key="") as aclient:
            aclient._stub = _Stub()
            async with aclosing(aclient.stream("a cat")) as stream:
                async for event in stream:
                    if isinstance(event, Progress):
                        break
            return aclient._stub.calls[0][-1]

    assert asyncio.run(leave_early()).cancelled


def test_cli_request_options_are_the_clients():
    """The CLI's request flags map onto exactly the client's options."""
    parser = argparse.ArgumentParser(parents=[Parents().request])
    options = request_options(parser.parse_args(["a cat", "--steps", "3", "--guidance", "2"]))
    assert set(options) == set(OPTIONS)
    assert (options["steps"], options["guidance_scale"], options["seed"]) == (3, 2.0, None)


def test_a_given_channel_stays_open_and_real_rpc_errors_are_client_errors():
    """Nothing listens on port 1: the call fails with a real grpc error, as a ClientError."""
    with grpc.insecure_channel("127.0.0.1:1") as channel:
        with Client(channel=channel, timeout=2.0):
            pass
        with pytest.raises(ClientError) as raised:  # not "closed channel": it is still open
            Client(channel=channel, timeout=2.0).models()
    assert raised.value.code in ("UNAVAILABLE", "DEADLINE_EXCEEDED")
    assert isinstance(raised.value.__cause__, grpc.RpcError)


def test_lora_options_in_every_form():
    from sdserve.client._calls import generate_request

    request = generate_request("x", {"loras": ["ink", "grain:0.5", ("a", 2), {"name": "b"}]})
    assert [(w.name, w.HasField("scale"), w.scale) for w in request.loras] == [
        ("ink", False, 0.0), ("grain", True, 0.5), ("a", True, 2.0), ("b", False, 0.0)
    ]  # fmt: skip
