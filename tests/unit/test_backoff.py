"""The job worker's waits while Redis is unreachable (redis-py's `EqualJitterBackoff`): how long
they are, that they grow while failures go on, and that a success starts them again."""

from __future__ import annotations

import asyncio

import pytest

from sdserve.errors import Unavailable
from sdserve.jobs import worker as worker_module
from sdserve.jobs.records import JobState, Outcome
from sdserve.jobs.worker import RECONNECT, Worker


def test_the_wait_doubles_from_a_tenth_of_a_second_to_five_with_equal_jitter():
    for failures, full in [(0, 0.1), (1, 0.2), (3, 0.8), (5, 3.2), (6, 5.0), (60, 5.0)]:
        waits = [RECONNECT.compute(failures) for _ in range(200)]
        assert all(full / 2 <= w <= full for w in waits), (failures, min(waits), max(waits))
        assert max(waits) - min(waits) > full / 10  # jittered, not one value


class _Counted:
    """Records the failure count of each wait and waits no time."""

    def __init__(self):
        self.failures: list[int] = []

    def compute(self, failures: int) -> float:
        self.failures.append(failures)
        return 0.0


class _FlakyQueue:
    """`claim` and `end` answer from a script: an exception is raised, anything else returned."""

    prefix, lease_s, max_attempts = "test:", 1.0, 3

    def __init__(self, claims: list, ends: list | None = None):
        self.claims, self.ends = claims, ends or []
        self.worker: Worker | None = None

    async def claim(self, consumer: str, block_ms: int):
        answer = self.claims.pop(0)
        if not self.claims:
            self.worker.stop()
        if isinstance(answer, Exception):
            raise answer
        return answer

    async def end(self, delivery, token, outcome, **kw):
        answer = self.ends.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer


@pytest.fixture
def waits(monkeypatch) -> _Counted:
    counted = _Counted()
    monkeypatch.setattr(worker_module, "RECONNECT", counted)
    return counted


def test_a_slot_waits_longer_per_failure_and_starts_again_after_a_success(waits):
    down = Unavailable("redis down")
    queue = _FlakyQueue([down, down, down, [], down, down, []])
    queue.worker = Worker(queue, run=None, consumer="c")
    asyncio.run(queue.worker._slot())
    assert waits.failures == [0, 1, 2, 0, 1]


def test_ending_an_attempt_retries_with_growing_waits_until_redis_answers(waits):
    down = Unavailable("redis down")
    queue = _FlakyQueue([], ends=[down, down, down, JobState.SUCCEEDED])
    worker = Worker(queue, run=None, consumer="c")
    state = asyncio.run(worker._end(None, 1, Outcome.SUCCEEDED, result=b""))
    assert state is JobState.SUCCEEDED and worker.counts["succeeded"] == 1
    assert waits.failures == [0, 1, 2]
