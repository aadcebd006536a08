"""Stats cross from the torch thread to the event loop through one thread-safe hand-off
(issue 27): the engine records while the Stats RPC reads, and the drain watch keeps
watching when a read fails."""

from __future__ import annotations

import asyncio
import threading
import time

from sdserve.metrics import StatsLogger
from sdserve.serve import _ray, common
from sdserve.stats import StepStats


def _step(images: int) -> StepStats:
    return StepStats(request_ids=("r",), batch_size=images, rows=images, shallow_rows=0,
                     latent_shape=(4, 8, 8), waiting=0, running=1, duration_s=1e-4)  # fmt: skip


def test_reading_stats_while_another_thread_records_them_never_fails():
    stats = StatsLogger()
    errors = []

    def record():
        try:
            for i in range(100_000):
                stats.record(_step(1 + i % 4))
        except Exception as exc:  # noqa: BLE001 - the test reports any
            errors.append(exc)

    writer = threading.Thread(target=record)
    writer.start()
    while writer.is_alive():
        try:
            stats.capacity()
            stats.unet_busy_ratio()
        except Exception as exc:  # noqa: BLE001
            errors.append(exc)
            break
        time.sleep(0.001)  # the recorder's turn
    writer.join()
    assert errors == []
    assert stats.denoiser.unet_steps == 100_000


def test_the_drain_watch_survives_a_failing_read(monkeypatch):
    answers = iter([RuntimeError("the GCS did not answer"), False, True])
    reads = []

    async def is_draining_async(app_name):
        reads.append(app_name)
        answer = next(answers)
        if isinstance(answer, Exception):
            raise answer
        return answer

    monkeypatch.setattr(_ray, "is_draining_async", is_draining_async)
    drained = []

    watch = common.watch_drain("app", lambda: drained.append(1), every_s=0.01)
    asyncio.run(asyncio.wait_for(watch, 1))
    assert drained == [1] and reads == ["app"] * 3


def test_polled_calls_leave_the_access_log_and_request_calls_stay(caplog):
    """Serve's access line of a polled method (the ingress's load polls, health probes) goes to
    DEBUG; a request's stage call keeps its INFO line (its request id follows it across
    replicas)."""
    import logging

    _ray.quiet_polls()
    _ray.quiet_polls()  # once, however many replicas set up in this process
    serves = logging.getLogger("ray.serve")
    assert sum(isinstance(f, _ray._QuietPolls) for f in serves.filters) == 1
    with caplog.at_level(logging.INFO, logger="ray.serve"):
        for line in ("CALL Stats OK 1.2ms", "CALL Info OK 0.8ms", "CALL Encode OK 4.1ms"):
            serves.info(line, extra={"serve_access_log": True})
        serves.info("CALL Stats is a word in an ordinary line")
    assert [r.getMessage() for r in caplog.records] == [
        "CALL Encode OK 4.1ms", "CALL Stats is a word in an ordinary line"]  # fmt: skip
    with caplog.at_level(logging.DEBUG, logger="ray.serve"):  # at DEBUG they show, as DEBUG
        serves.info("CALL Stats OK 1.1ms", extra={"serve_access_log": True})
    assert (caplog.records[-1].getMessage(), caplog.records[-1].levelname) == (
        "CALL Stats OK 1.1ms", "DEBUG")  # fmt: skip


def test_drain_waits_up_to_the_longest_shutdown_time_of_any_models_stage(monkeypatch):
    """`sdserve serve`'s drain on shutdown: the optional stages (text_encoder_t5, unset here
    but for one model) neither break it nor are left out of its bound."""
    from sdserve.config import SdserveConfig
    from sdserve.serve import server

    monkeypatch.setattr(_ray, "set_draining", lambda app, draining: None)
    monkeypatch.setattr(_ray, "ongoing_requests", lambda app: 1)  # never quiet: runs to the bound
    quick = {"graceful_shutdown_timeout_s": 0.0}
    t5 = {"text_encoder_t5": {"graceful_shutdown_timeout_s": 0.3}}
    config = SdserveConfig.model_validate({
        "stages": dict.fromkeys(("ingress", "text_encoder", "denoiser", "vae_decoder",
                                 "vae_encoder", "job_worker"), quick),
        "models": [{"name": "a"}, {"name": "b", "stages": t5}],
    })  # fmt: skip
    started = time.monotonic()
    server.drain(config, poll_s=0.05)
    assert 0.3 <= time.monotonic() - started < 2.0
