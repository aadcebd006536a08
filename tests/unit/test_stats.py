"""The one stats path: typed stats in, metrics and counters out."""

from __future__ import annotations

import pytest

from sdserve import metrics
from sdserve.metrics import Metrics, StatsLogger
from sdserve.stats import JobEvent, RequestEnded, RpcDone, StepStats


class Recorded:
    """A metric factory that keeps every call, so tests can see what was recorded."""

    def __init__(self):
        self.calls: list[tuple[str, str, float, dict]] = []

    def __call__(self, spec):
        calls = self.calls

        class Metric:
            def inc(self, value=1.0, tags=None):
                calls.append((spec.name, "inc", value, tags or {}))

            def observe(self, value, tags=None):
                calls.append((spec.name, "observe", value, tags or {}))

            def set(self, value, tags=None):
                calls.append((spec.name, "set", value, tags or {}))

        return Metric()


def _step(duration=0.5, ids=("a", "b"), images=3, controlled=0):
    return StepStats(request_ids=ids, batch_size=images, rows=images + 2, latent_shape=(4, 8, 8),
                     waiting=1, running=2, duration_s=duration, controlled=controlled)  # fmt: skip


def test_a_step_feeds_the_counters_and_the_metrics():
    recorded = Recorded()
    stats = StatsLogger(Metrics(recorded))
    stats.record(_step(controlled=2))
    stats.record(_step(ids=("a",), images=1))
    c = stats.denoiser
    assert (c.unet_steps, c.image_steps, c.shared_steps) == (2, 4, 1)
    assert c.unet_seconds == pytest.approx(1.0)
    names = [name for name, *_ in recorded.calls]
    assert names.count("sdserve_denoising_steps") == 2
    assert [call for call in recorded.calls if call[0] == "sdserve_controlnet_image_steps"] == [
        ("sdserve_controlnet_image_steps", "inc", 2, {})
    ]
    assert ("sdserve_denoiser_batch_size", "observe", 3, {}) in recorded.calls


def test_busy_ratio_is_the_share_of_the_window_in_steps(monkeypatch):
    now = [1000.0]
    monkeypatch.setattr(metrics.time, "monotonic", lambda: now[0])
    stats = StatsLogger()
    for _ in range(4):  # 4 steps of 2 s in 8 s
        now[0] += 2.0
        stats.record(_step(duration=2.0))
    assert stats.unet_busy_ratio() == pytest.approx(0.8)  # 8 s busy of the last 10 s
    now[0] += 7.0  # idle: the window slides past most steps
    assert stats.unet_busy_ratio() == pytest.approx(0.4)  # the steps that ended at +6 s, +8 s
    now[0] += 10.0
    assert stats.unet_busy_ratio() == 0.0


def test_jobs_rpcs_and_ended_requests():
    recorded = Recorded()
    stats = StatsLogger(Metrics(recorded))
    for name in ("started", "succeeded", "dead_lettered"):
        stats.record(JobEvent(name))
    stats.record(RpcDone("Generate", "INVALID_ARGUMENT", 0.01))
    stats.record(RequestEnded("cancelled", waiting=0, running=0))
    assert stats.jobs == {"started": 1, "succeeded": 1, "dead_lettered": 1}
    assert stats.denoiser.cancelled == 1
    assert ("sdserve_jobs_finished", "inc", 1.0, {"state": "SUCCEEDED"}) in recorded.calls
    assert ("sdserve_requests", "inc", 1.0,
            {"rpc": "Generate", "code": "INVALID_ARGUMENT"}) in recorded.calls  # fmt: skip


def test_without_a_factory_nothing_is_recorded():
    stats = StatsLogger()
    assert not stats.metrics.enabled
    stats.record(_step())  # counts still work
    assert stats.denoiser.unet_steps == 1
