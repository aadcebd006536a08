"""The engine's priority policy (`sdserve.pipeline.scheduling`): classes, deadlines, tenants and
preemption at step boundaries, driven step by step without Ray; `fifo` kept as it was."""

from __future__ import annotations

import time

import pytest
import torch
from helpers import engine_job as _job
from helpers import load_parts

from sdserve.pipeline.engine import DenoiseEngine, Finished, Paused, Started
from sdserve.pipeline.scheduling import BULK, FairOrder


@pytest.fixture(scope="module")
def parts(tiny_model):
    return load_parts(tiny_model)


def _classed(parts, request_id, request_class="interactive", tenant="", priority="", **kwargs):
    job, recorder = _job(parts, request_id, **kwargs)
    job.request_class, job.tenant, job.priority = request_class, tenant, priority
    return job, recorder


def _run(engine: DenoiseEngine, limit: int = 200) -> list[tuple[str, ...]]:
    """Steps the engine until it is idle; the request ids of each forward."""
    forwards = []
    for _ in range(limit):
        stats = engine.step()
        if stats is None and engine.counts() == (0, 0):
            return forwards
        if stats is not None:
            forwards.append(tuple(sorted(stats.request_ids)))
    raise AssertionError("the engine did not finish")


def test_interactive_request_pauses_bulk_and_the_resumed_image_equals_its_unpaused_run(parts):
    engine = DenoiseEngine(parts[1].unet, max_batch_size=4)
    bulk, bulk_events = _classed(parts, "bulk", BULK, seeds=(3, 4), steps=8)
    engine.submit(bulk)
    for _ in range(3):
        engine.step()  # the bulk job runs 3 of its 8 steps alone
    person, person_events = _classed(parts, "person", steps=4)
    engine.submit(person)
    forwards = _run(engine)

    # The person's 4 steps ran alone (bulk paused at the step boundary), then the bulk resumed.
    assert forwards == [("person",)] * 4 + [("bulk",)] * 5
    assert sum(isinstance(e, Paused) for e in bulk_events.events) == 1
    (done,) = [e for e in bulk_events.events if isinstance(e, Finished)]
    assert done.paused_s > 0

    alone = DenoiseEngine(parts[1].unet, max_batch_size=4)
    again, again_events = _classed(parts, "bulk", BULK, seeds=(3, 4), steps=8)
    alone.submit(again)
    _run(alone)
    # Paused and resumed, it ran in the same forwards (alone) as unpaused: bit for bit equal.
    assert torch.equal(done.latents, again_events.latents)


def test_fifo_keeps_bulk_in_the_interactive_requests_forwards(parts):
    engine = DenoiseEngine(parts[1].unet, max_batch_size=4, policy="fifo")
    bulk, bulk_events = _classed(parts, "bulk", BULK, steps=6)
    engine.submit(bulk)
    engine.step()
    person, _ = _classed(parts, "person", steps=3)
    engine.submit(person)
    forwards = _run(engine)
    assert forwards[:3] == [("bulk", "person")] * 3
    assert not any(isinstance(e, Paused) for e in bulk_events.events)


def test_bulk_beside_interactive_allows_that_many_bulk_images(parts):
    engine = DenoiseEngine(parts[1].unet, max_batch_size=4, bulk_images_with_interactive=1)
    first, _ = _classed(parts, "bulk-1", BULK, steps=5)
    second, second_events = _classed(parts, "bulk-2", BULK, steps=5, seeds=(9,))
    engine.submit(first)
    engine.submit(second)
    engine.step()
    person, _ = _classed(parts, "person", steps=2)
    engine.submit(person)
    forwards = _run(engine)
    # One bulk image (the first admitted) runs beside the person; the other pauses.
    assert forwards[:2] == [("bulk-1", "person")] * 2
    assert any(isinstance(e, Paused) for e in second_events.events)


def test_interactive_waiting_is_admitted_before_bulk_waiting_and_by_deadline(parts):
    engine = DenoiseEngine(parts[1].unet, max_batch_size=1)
    now = time.monotonic()
    jobs = [
        _classed(parts, "bulk-low", BULK, priority="low", steps=1)[0],
        _classed(parts, "bulk-high", BULK, priority="high", steps=1)[0],
        _classed(parts, "late", steps=1, deadline=now + 100)[0],
        _classed(parts, "soon", steps=1, deadline=now + 50)[0],
        _classed(parts, "no-deadline", steps=1)[0],
    ]
    for job in jobs:
        engine.submit(job)
    order = [ids[0] for ids in _run(engine)]
    assert order == ["soon", "late", "no-deadline", "bulk-high", "bulk-low"]


def test_a_flooding_tenant_does_not_starve_another(parts):
    engine = DenoiseEngine(parts[1].unet, max_batch_size=1)
    for i in range(6):
        engine.submit(_classed(parts, f"a{i}", BULK, tenant="a", steps=1)[0])
    for i in range(2):
        engine.submit(_classed(parts, f"b{i}", BULK, tenant="b", steps=1)[0])
    order = [ids[0] for ids in _run(engine)]
    # b arrived after a's six, yet its two run among a's first ones, not after all six.
    assert order.index("b1") <= 3
    assert order == sorted(order, key=lambda r: int(r[1:]) * 2 + (r[0] == "b"))


def test_fair_order_gives_a_returning_tenant_no_saved_credit():
    order = FairOrder()

    class Job:
        def __init__(self, tenant, n):
            self.tenant, self.request_class, self.priority = tenant, BULK, ""
            self.images, self.total, self.deadline, self.submitted_at = 1, 10, None, n

    busy = [Job("a", n) for n in range(4)]
    for job in order.order(busy)[:3]:
        order.charge(job)  # a was given 30 image-steps while b was idle
    first = order.order([*busy[3:], Job("b", 10), Job("b", 11)])
    # b starts level with a: they alternate (by arrival on a tie), not b twice first.
    assert [j.tenant for j in first] == ["a", "b", "b"]


def test_unknown_policy_is_refused(parts):
    with pytest.raises(ValueError, match="policy"):
        DenoiseEngine(parts[1].unet, policy="lottery")


def test_paused_request_started_once(parts):
    engine = DenoiseEngine(parts[1].unet, max_batch_size=2)
    bulk, events = _classed(parts, "bulk", BULK, steps=3)
    engine.submit(bulk)
    engine.step()
    engine.submit(_classed(parts, "person", steps=2)[0])
    _run(engine)
    assert sum(isinstance(e, Started) for e in events.events) == 1
