"""Every request ends (issue 27): fault injection at each place a request could be left
waiting forever. Each test makes one part fail or never answer, and checks that the request
still ends, with the status its caller should see, in well under a second or two."""

from __future__ import annotations

import asyncio
import time

import pytest

from sdserve.api.types import GenerateFields, Result
from sdserve.errors import DeadlineExceeded, Internal, Unavailable
from sdserve.orchestration.client import StageClient
from sdserve.orchestration.path import StagePath
from sdserve.pipeline import engine as eng
from sdserve.pipeline.engine import DenoiseEngine, Failed, Finished


@pytest.fixture(scope="module")
def path(in_process_path):
    return in_process_path


@pytest.fixture(scope="module")
def service(path):
    return path.client.denoiser


def _job(path, request_id, *, seeds=(0,), steps=3, on_event=None):
    """A Denoiser job of the tiny model, with no guidance (one row per image)."""
    text = path.client.text_encoder.part
    emb = text.encode("a red circle", "", with_uncond=False)
    events = []
    job = path.client.denoiser.denoiser.make_job(
        request_id, emb.cond, None, width=64, height=64, steps=steps, guidance_scale=1.0,
        scheduler="ddim", seeds=list(seeds), on_event=on_event or events.append,
    )  # fmt: skip
    return job, events


def _run(engine, limit=100):
    for _ in range(limit):
        engine.step()
        if engine.counts() == (0, 0):
            return
    raise AssertionError("the engine did not drain")


async def _generate(path, within_s=2.0, **run):
    params = await path.validate(GenerateFields(prompt="a red circle", steps=3, seed=1,
                                                guidance_scale=1.0))  # fmt: skip
    return await asyncio.wait_for(_last(path.run(params, **run)), within_s)


async def _last(events):
    return [event async for event in events][-1]


# -- 1. a terminal callback that raises --------------------------------------------------------
def test_an_engine_whose_finished_callback_raises_fails_the_request(path):
    events = []

    def raising(event):
        events.append(event)
        if isinstance(event, Finished):
            raise RuntimeError("the consumer broke on the result")

    job, _ = _job(path, "r", on_event=raising)
    engine = DenoiseEngine(path.client.denoiser.denoiser.unet)
    engine.submit(job)
    _run(engine)
    assert [type(e) for e in events[-2:]] == [Finished, Failed]
    assert "consumer broke" in str(events[-1].error)


def test_a_request_whose_result_cannot_be_delivered_ends_with_internal(path, service, monkeypatch):
    message = service._message

    def broken(event, req, progress, *rest):
        if isinstance(event, eng.Finished):
            raise RuntimeError("the result could not be copied")
        return message(event, req, progress, *rest)

    monkeypatch.setattr(service, "_message", broken)
    with pytest.raises(Internal):
        asyncio.run(_generate(path, within_s=1.0))


# -- 2. an engine that never answers, an engine that stops -------------------------------------
@pytest.mark.parametrize("client_deadline", [True, False])
def test_a_denoiser_whose_engine_never_answers_ends_at_the_deadline(
    path, service, monkeypatch, client_deadline
):
    monkeypatch.setattr(service.engine, "submit", lambda job: None)  # swallowed
    monkeypatch.setattr(service, "max_request_s", 0.3, raising=False)
    deadline = time.time() + 0.3 if client_deadline else None
    started = time.monotonic()
    with pytest.raises(DeadlineExceeded):
        asyncio.run(_generate(path, within_s=1.5, deadline=deadline))
    assert time.monotonic() - started < 1.2


def test_stopping_an_engine_fails_what_it_holds_with_unavailable(path):
    engine = DenoiseEngine(path.client.denoiser.denoiser.unet, max_batch_size=1)
    jobs = [_job(path, f"r{i}", seeds=(i,)) for i in range(3)]
    for job, _ in jobs:
        engine.submit(job)
    engine.step()  # r0 running, r1 and r2 waiting
    assert engine.counts() == (2, 1)
    engine.stop(timeout_s=1)
    for _, events in jobs:
        assert isinstance(events[-1], Failed) and isinstance(events[-1].error, Unavailable)
    assert engine.counts() == (0, 0)
    late, events = _job(path, "late")
    engine.submit(late)  # a stopped engine takes nothing more
    assert isinstance(events[-1], Failed) and isinstance(events[-1].error, Unavailable)


def test_the_denoiser_answers_unavailable_when_its_engine_stops(service):
    from types import SimpleNamespace

    request = SimpleNamespace(request_id="r")
    error = service._message(eng.Failed(Unavailable("the engine stopped")), request, False)
    assert isinstance(error, Unavailable) and "request r" in str(error)


# -- 3. stats recording cannot fail a step -----------------------------------------------------
def test_a_failing_stats_recorder_fails_no_step(path, service, monkeypatch):
    def broken(item):
        raise RuntimeError("deque mutated during iteration")

    monkeypatch.setattr(service.stats, "record", broken)
    result = asyncio.run(_generate(path, within_s=2.0))
    assert isinstance(result, Result) and len(result.pngs) == 1


def test_the_engine_survives_an_on_stats_that_raises(path):
    def broken(stats):
        raise RuntimeError("a broken logger")

    job, events = _job(path, "r")
    engine = DenoiseEngine(path.client.denoiser.denoiser.unet, on_stats=broken)
    engine.submit(job)
    _run(engine)
    assert isinstance(events[-1], Finished)


def test_previews_are_encoded_off_the_event_loop(path, monkeypatch):
    import threading

    from sdserve.stages import denoiser

    threads = []
    to_png = denoiser.to_png

    def recording(pixels):
        threads.append(threading.current_thread())
        return to_png(pixels)

    monkeypatch.setattr(denoiser, "to_png", recording)

    async def main():
        params = await path.validate(GenerateFields(prompt="p", steps=2, guidance_scale=1.0))
        async for _ in path.run(params, stream=True, preview_every=1):
            pass
        return threading.current_thread()

    loop_thread = asyncio.run(main())
    assert threads and loop_thread not in threads


# -- 4. waiting requests hold no noise ---------------------------------------------------------
def test_waiting_requests_allocate_no_noise_until_admitted(path, monkeypatch):
    from sdserve.pipeline import denoise

    made = []
    make_sample = denoise.make_sample

    def counting(**kwargs):
        made.append(kwargs["seed"])
        return make_sample(**kwargs)

    monkeypatch.setattr(denoise, "make_sample", counting)
    engine = DenoiseEngine(path.client.denoiser.denoiser.unet, max_batch_size=2)
    jobs = [_job(path, f"r{i}", seeds=(2 * i, 2 * i + 1)) for i in range(3)]
    for job, _ in jobs:
        engine.submit(job)
    assert made == [] and engine.work_ahead() == 3 * 2 * 3
    engine.step()  # r0 joins the batch (two images); r1 and r2 wait
    assert made == [0, 1]
    _run(engine)
    assert made == [0, 1, 2, 3, 4, 5]
    assert all(isinstance(events[-1], Finished) for _, events in jobs)


# -- 5. stage calls bounded by the deadline ----------------------------------------------------
class _Hanging(StageClient):
    """The in-process client, except that one stage never answers."""

    def __init__(self, inner, stage: str):
        self.inner, self.stage, self.cancelled = inner, stage, []

    async def _never(self, stage):
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            self.cancelled.append(stage)
            raise

    async def encode_text(self, req):
        if self.stage == "encode_text":
            await self._never("encode_text")
        return await self.inner.encode_text(req)

    async def encode_t5(self, req):
        return await self.inner.encode_t5(req)

    async def encode_image(self, req):
        return await self.inner.encode_image(req)

    async def denoise(self, req):
        if self.stage == "denoise":
            await self._never("denoise")
        return await self.inner.denoise(req)

    async def denoise_stream(self, req):
        if self.stage == "denoise_stream":
            await self._never("denoise_stream")
        async for event in self.inner.denoise_stream(req):
            yield event

    async def decode(self, req):
        if self.stage == "decode":
            await self._never("decode")
        return await self.inner.decode(req)

    async def denoiser_info(self):
        return await self.inner.denoiser_info()

    async def stage_infos(self):
        return await self.inner.stage_infos()

    async def denoiser_stats(self):
        return await self.inner.denoiser_stats()


@pytest.mark.parametrize("stage", ["encode_text", "denoise", "denoise_stream", "decode"])
@pytest.mark.parametrize("client_deadline", [True, False])
def test_a_stage_that_never_answers_ends_the_request_at_its_deadline(path, stage, client_deadline):
    engine = path.config.engine.model_copy(update={"max_request_s": 0.3})
    config = path.config.model_copy(update={"engine": engine})
    client = _Hanging(path.client, stage)
    hanging = StagePath(client, config)
    deadline = time.time() + 0.3 if client_deadline else None
    started = time.monotonic()
    with pytest.raises(DeadlineExceeded):
        asyncio.run(_generate(hanging, within_s=1.5, deadline=deadline,
                              stream=stage == "denoise_stream"))  # fmt: skip
    assert time.monotonic() - started < 1.2
    assert client.cancelled == [stage]


def test_a_stage_replica_lost_mid_call_ends_the_request_unavailable():
    """A stage replica killed during a call (tests/chaos kills them under load) raises Ray's
    actor errors in the ingress: the client sees UNAVAILABLE, which it may retry, not INTERNAL."""
    import grpc
    from ray.exceptions import ActorDiedError, ActorUnavailableError

    from sdserve.serve.errors import status_for

    for exc in (ActorUnavailableError("Actor is unavailable.", None), ActorDiedError()):
        code, message = status_for(exc)
        assert code == grpc.StatusCode.UNAVAILABLE and type(exc).__name__ in message


def test_requests_with_a_deadline_count_as_met_or_missed_by_class(path, monkeypatch):
    from sdserve.orchestration.path import Who
    from sdserve.stats import DeadlineOutcome

    outcomes = []
    record = path.stats.record
    monkeypatch.setattr(path.stats, "record", lambda item: (outcomes.append(item), record(item)))
    asyncio.run(_generate(path, deadline=time.time() + 30))
    asyncio.run(_generate(path, deadline=time.time() + 30, who=Who("bulk")))
    with pytest.raises(DeadlineExceeded):
        asyncio.run(_generate(path, deadline=time.time() - 1))
    asyncio.run(_generate(path))  # no deadline: not counted
    assert [o for o in outcomes if isinstance(o, DeadlineOutcome)] == [
        DeadlineOutcome("interactive", True), DeadlineOutcome("bulk", True),
        DeadlineOutcome("interactive", False),
    ]  # fmt: skip
