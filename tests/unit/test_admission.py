"""Load shedding: refuse at once what would wait too long or end after its deadline."""

from __future__ import annotations

import time

import pytest

from sdserve.api.types import GenerateParams
from sdserve.errors import ResourceExhausted
from sdserve.orchestration.admission import Admission
from sdserve.stages.messages import DenoiserStats


def _params(steps=10, images=1):
    return GenerateParams(
        prompt="x", negative_prompt="", width=64, height=64, steps=steps, guidance_scale=7.5,
        scheduler="ddim", seed=0, num_images=images,
    )  # fmt: skip


def _admission(work_ahead, capacity, **kw):
    admission = Admission(**kw)
    admission.update(DenoiserStats(work_ahead=work_ahead, capacity=capacity,
                                   interactive_work_ahead=work_ahead))  # fmt: skip
    return admission


def test_unmeasured_capacity_admits_everything():
    """Before the Denoiser has measured its speed, nothing is refused, however much work is
    ahead or however near the deadline; what is admitted is counted."""
    admission = _admission(10**6, 0.0, max_wait_s=1.0)
    assert admission.admit(_params(steps=10, images=2), deadline=time.time() + 0.01) == 20
    assert admission.admit(_params(steps=5), deadline=time.time() + 0.01) == 5
    assert admission.outstanding == 25
    assert admission.work_ahead == 10**6


def test_a_request_that_would_wait_too_long_is_refused_with_a_hint():
    admission = _admission(1000, 100.0, max_wait_s=5.0)  # 10 s of work ahead
    with pytest.raises(ResourceExhausted) as err:
        admission.admit(_params())
    assert "wait about 10s" in str(err.value)
    assert err.value.retry_after_s == pytest.approx(5.0)


def test_a_request_that_would_miss_its_deadline_is_refused():
    admission = _admission(400, 100.0, margin=1.25, slack_s=1.0)  # (400 + 10) / 100 = 4.1 s
    admission.admit(_params(), deadline=time.time() + 7.0)  # 1.25 * 4.1 + 1 = 6.1 s: in time
    with pytest.raises(ResourceExhausted) as err:
        admission.admit(_params(), deadline=time.time() + 5.0)
    assert "after its deadline" in str(err.value) and err.value.retry_after_s >= 1.0


def test_admitted_work_counts_until_it_ends_whatever_the_denoiser_holds():
    """Requests admitted in a burst may not have reached the Denoiser at its next reading:
    they count until they end."""
    admission = _admission(0, 100.0, max_wait_s=1.0)
    blocks = [admission.admitted(_params()) for _ in range(11)]  # 1.1 s of work
    for block in blocks:
        block.__enter__()
    admission.update(DenoiserStats(work_ahead=0, capacity=100.0))  # none arrived
    with pytest.raises(ResourceExhausted):
        admission.admit(_params())
    for block in blocks:
        block.__exit__(None, None, None)
    assert admission.outstanding == 0
    admission.admit(_params())


def test_bulk_work_that_pauses_for_interactive_requests_refuses_none_of_them():
    """The Denoiser holds an hour of bulk work (jobs) and no interactive work: an interactive
    request with a near deadline is admitted, since the bulk work pauses for it."""
    admission = Admission(max_wait_s=5.0)
    admission.update(DenoiserStats(work_ahead=360_000, interactive_work_ahead=0, capacity=100.0))
    assert admission.admit(_params(), deadline=time.time() + 3.0) == 10


def test_capacity_predicts_a_full_forward_from_a_quiet_minute():
    """Steps of 1 and 2 images at 0.10 s and 0.12 s (a line of 0.08 s + 0.02 s per image) say
    that a full forward of 16 images takes 0.40 s: 40 image-steps/s, where the steps seen
    alone read 6 / 0.44 = 13.6."""
    from sdserve.metrics import StatsLogger
    from sdserve.stats import StepStats

    stats = StatsLogger()
    for images, seconds in [(1, 0.10), (2, 0.12), (1, 0.10), (2, 0.12)]:
        stats.record(StepStats(("r",), images, images, (1, 4, 8, 8), 0, 1, seconds))
    assert stats.capacity() == pytest.approx(6 / 0.44)
    stats.full_batch = 16
    assert stats.capacity() == pytest.approx(16 / (0.08 + 0.02 * 16))
