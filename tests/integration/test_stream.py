"""GenerateStream, cancellation and deadlines through the real stack."""

from __future__ import annotations

import io
import threading
import time

import grpc
import numpy as np
import pytest
from helpers import denoiser_stats
from PIL import Image

from sdserve.v1 import diffusion_pb2, stages_pb2

pytestmark = pytest.mark.integration


def _wait_until(predicate, timeout_s=20.0):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError("condition not met in time")


def test_stream_events_are_complete_and_ordered(stub):
    request = diffusion_pb2.GenerateRequest(
        prompt="a red circle", steps=6, seed=9, scheduler="ddim", preview_every=2
    )
    events = list(stub.GenerateStream(request, timeout=60))
    kinds = [e.WhichOneof("event") for e in events]
    assert kinds[0] == "queued" and events[0].queued.request_id
    assert kinds[-1] == "result" and kinds.count("result") == 1
    progress = [e.progress for e in events if e.HasField("progress")]
    assert [(p.step, p.total) for p in progress] == [(k, 6) for k in range(1, 7)]
    assert all(a.elapsed_s <= b.elapsed_s for a, b in zip(progress, progress[1:], strict=False))
    previews = [(i, e.preview) for i, e in enumerate(events) if e.HasField("preview")]
    assert [p.step for _, p in previews] == [2, 4, 6]
    for i, preview in previews:  # each preview follows its step's progress event
        assert events[i - 1].progress.step == preview.step
        assert Image.open(io.BytesIO(preview.png[0])).size == (64, 64)
    unary = stub.Generate(request, timeout=60)
    streamed = events[-1].result
    assert [im.seed for im in streamed.images] == [9]
    a = np.asarray(Image.open(io.BytesIO(streamed.images[0].png)))
    b = np.asarray(Image.open(io.BytesIO(unary.images[0].png)))
    assert np.array_equal(a, b)


def _freed(server, before, timeout_s=8.0) -> stages_pb2.DenoiserStats | None:
    """Stats once the Denoiser counted one more cancellation and runs nothing; else None."""
    try:
        return _wait_until(
            lambda: (
                (s := denoiser_stats(server.config.server.app_name)).cancelled > before.cancelled
                and s.running == 0
                and s
            ),
            timeout_s,
        )
    except AssertionError:
        return None


def test_cancelled_denoiser_call_leaves_the_batch(server):
    """The Denoiser side, through a deployment handle: cancelling the call frees the slot."""
    import torch
    from ray import serve

    from sdserve.serve.stage_messages import tensor_to_pb

    handle = serve.get_deployment_handle("Denoiser", app_name=server.config.server.app_name)
    before = denoiser_stats(server.config.server.app_name)
    request = stages_pb2.DenoiseRequest(
        request_id="handle-cancel", cond=tensor_to_pb(torch.zeros(1, 77, 32)), width=128,
        height=128, steps=150, guidance_scale=1.0, scheduler="ddim", seeds=[0],
    )  # fmt: skip
    events = handle.options(stream=True).DenoiseStream.remote(request.SerializeToString())
    steps = 0
    for raw in events:
        if stages_pb2.DenoiseEvent.FromString(raw).HasField("step"):
            steps += 1
            if steps == 2:
                break
    events.cancel()
    after = _freed(server, before)
    assert after is not None, "the cancelled request still holds its batch slot"
    assert after.finished == before.finished  # never finished, so never decoded
    assert after.unet_steps - before.unet_steps < 150


# Between Serve's gRPC proxy and the ingress, Serve forwards a client's cancellation on a best
# effort basis (ray-project/ray#52533, #44644): the proxy's own generator is closed mid-yield
# ("async generator ignored GeneratorExit" in its log) and the replica never hears of it
# (docs/operations.md, "Cancellation"). Measured on 2026-12-05, 8 cancellations a run: 8, 7, 5
# and 3 passed on (4 runs, 13 missed of 32, about 1 in 3 when the whole suite's server is busy;
# an earlier session measured 1 in 5 to 7). That is a limit of Serve, not a flake, so the test
# below measures the rate over a fixed number of cancellations and states the limit, instead
# of retrying until one gets through; sdserve's own front door (issue 27) is to make every
# one arrive. From the ingress inward sdserve cancels every stage call itself (the test above;
# 50 of 50 in tests/unit/test_orchestration.py), and each cancellation that arrives must free
# the slot without finishing the image (asserted per call below).
CANCELS = 8
MIN_FREED = 2
"""With a miss rate of 1 in 3, fewer than 2 of 8 freed happens about once in 400 runs; a
server that never frees a slot (0 of 8) still fails."""


def test_client_cancel_frees_the_batch_slot(server, stub):
    freed = []
    for i in range(CANCELS):
        before = denoiser_stats(server.config.server.app_name)
        request = diffusion_pb2.GenerateRequest(
            prompt="a long one", steps=150, seed=i, width=128, height=128
        )
        call = stub.GenerateStream(request, timeout=120)
        for event in call:
            if event.HasField("progress") and event.progress.step >= 2:
                break
        call.cancel()
        after = _freed(server, before)
        _wait_until(lambda: denoiser_stats(server.config.server.app_name).running == 0, 30)
        if after is not None:
            assert after.finished == before.finished  # it never finished: never decoded
        freed.append(after is not None)
    assert sum(freed) >= MIN_FREED, f"Serve passed {sum(freed)} of {CANCELS} cancellations on"


def test_the_clients_deadline_reaches_the_server(server, stub):
    """Serve's proxy does not pass a client's deadline on; sdserve's proxy hook does
    (sdserve.serve._ray.add_diffusion_service). A request that cannot finish in its 1 s is
    either refused at once by load shedding, which names its deadline, or admitted and then
    dropped by the Denoiser when the deadline passes; never finished, never decoded. Every
    time, not one try in several."""
    for seed in range(3):
        before = denoiser_stats(server.config.server.app_name)
        request = diffusion_pb2.GenerateRequest(
            prompt="too slow", steps=150, seed=seed, width=128, height=128
        )
        started = time.monotonic()
        with pytest.raises(grpc.RpcError) as err:
            stub.Generate(request, timeout=1.0)
        code = err.value.code()
        if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
            assert "after its deadline in 1.0s" in err.value.details()
            assert time.monotonic() - started < 0.5  # refused at once
            after = denoiser_stats(server.config.server.app_name)
        else:
            assert code == grpc.StatusCode.DEADLINE_EXCEEDED, err.value
            after = _wait_until(
                lambda before=before: (
                    (s := denoiser_stats(server.config.server.app_name)).expired > before.expired
                    and s.running == 0
                    and s
                ),
                10,
            )
            assert after.expired - before.expired == 1
        assert after.finished == before.finished  # never finished, so never decoded


def test_a_denoise_request_past_its_timeout_is_dropped(server):
    """The Denoiser side of deadlines: DenoiseRequest.timeout_s, which the stage path sets from
    the client's deadline, drops the request at the step where it passes."""
    import torch
    from ray import serve

    from sdserve.serve.stage_messages import tensor_to_pb

    handle = serve.get_deployment_handle("Denoiser", app_name=server.config.server.app_name)
    before = denoiser_stats(server.config.server.app_name)
    request = stages_pb2.DenoiseRequest(
        request_id="handle-deadline", cond=tensor_to_pb(torch.zeros(1, 77, 32)), width=128,
        height=128, steps=150, guidance_scale=1.0, scheduler="ddim", seeds=[0], timeout_s=0.3,
    )  # fmt: skip
    with pytest.raises(Exception, match="deadline exceeded"):
        handle.Denoise.remote(request.SerializeToString()).result(timeout_s=30)
    after = denoiser_stats(server.config.server.app_name)
    assert after.expired - before.expired == 1 and after.finished == before.finished
    assert after.unet_steps - before.unet_steps < 150


def test_concurrent_requests_share_u_net_steps(server, stub):
    before = denoiser_stats(server.config.server.app_name)
    replies, errors = [], []

    def call(seed):
        try:
            request = diffusion_pb2.GenerateRequest(prompt="a crowd", steps=20, seed=seed)
            replies.append(stub.Generate(request, timeout=120))
        except grpc.RpcError as exc:  # collected and asserted below
            errors.append(exc)

    threads = [threading.Thread(target=call, args=(seed,)) for seed in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(replies) == 6
    after = denoiser_stats(server.config.server.app_name)
    # Six 20-step requests sent at once join one running batch (measured here: 21 forwards, all
    # shared, against 120 alone); the bound leaves 5 forwards for arrivals spread by the proxy.
    assert after.unet_steps - before.unet_steps <= 20 + 5
    assert after.shared_steps - before.shared_steps >= 20 - 5
