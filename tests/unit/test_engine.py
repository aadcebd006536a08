"""The Denoiser engine (step-level batching), driven step by step without Ray."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
import torch
from helpers import engine_job as _job
from helpers import load_parts, solo_latents

from sdserve.pipeline.engine import (
    Cancelled,
    DenoiseEngine,
    Finished,
    Queued,
    Started,
    Step,
)


@pytest.fixture(scope="module")
def parts(tiny_model):
    return load_parts(tiny_model)


def _solo(parts, **kwargs):
    text, denoiser, _ = parts
    return solo_latents(text, denoiser, **kwargs)


def _run(engine, limit=1000):
    stats = []
    for _ in range(limit):
        s = engine.step()
        if s is None and engine.counts() == (0, 0):
            return stats
        if s is not None:
            stats.append(s)
    raise AssertionError("engine did not drain")


def _max_pixel_diff(parts, a, b):
    vae = parts[2]
    return np.abs(vae.decode(a).astype(int) - vae.decode(b).astype(int)).max()


def test_batch_invariance_alone_or_among_15_others(parts):
    _, denoiser, _ = parts
    alone = _solo(parts, prompt="a blue square", seeds=(42,), scheduler="euler_ancestral")
    engine = DenoiseEngine(denoiser.unet, max_batch_size=16)
    others = [
        _job(
            parts,
            f"other{i}",
            prompt=f"prompt number {i}",
            seeds=(i,),
            scheduler="euler_ancestral",
            guidance=[1.0, 3.0, 7.5][i % 3],
        )
        for i in range(15)
    ]
    target, recorder = _job(
        parts, "target", prompt="a blue square", seeds=(42,), scheduler="euler_ancestral"
    )
    for job, _ in others[:7]:
        engine.submit(job)
    engine.submit(target)
    for job, _ in others[7:]:
        engine.submit(job)
    stats = _run(engine)
    assert max(s.batch_size for s in stats) == 16  # they really shared forwards
    assert _max_pixel_diff(parts, alone, recorder.latents) <= 2


def test_two_schedulers_and_two_step_counts_share_a_batch(parts):
    _, denoiser, _ = parts
    specs = [
        dict(scheduler="dpmpp_2m", steps=5, seeds=(1,)),
        dict(scheduler="ddpm", steps=9, seeds=(2,)),
        dict(scheduler="dpmpp_2m", steps=9, seeds=(3,), guidance=1.0),
        dict(scheduler="ddpm", steps=5, seeds=(4, 5)),
    ]
    engine = DenoiseEngine(denoiser.unet, max_batch_size=16)
    jobs = [_job(parts, f"r{i}", **spec) for i, spec in enumerate(specs)]
    for job, _ in jobs:
        engine.submit(job)
    stats = _run(engine)
    assert stats[0].request_ids == ("r0", "r1", "r2", "r3")  # one forward, all four requests
    assert stats[0].batch_size == 5
    assert stats[0].rows == 5 + 4  # r2 has guidance 1: no unconditional row
    assert len(stats) == 9  # the 5-step requests left after step 5, the rest went on
    assert all(s.request_ids == ("r1", "r2") for s in stats[5:])
    for spec, (_, recorder) in zip(specs, jobs, strict=True):
        assert _max_pixel_diff(parts, _solo(parts, **spec), recorder.latents) <= 2


def test_events_are_complete_and_ordered(parts):
    _, denoiser, _ = parts
    engine = DenoiseEngine(denoiser.unet)
    job, recorder = _job(parts, "r", steps=4, preview_every=2)
    engine.submit(job)
    _run(engine)
    kinds = [type(e) for e in recorder.events]
    assert kinds == [Queued, Started, Step, Step, Step, Step, Finished]
    steps = [e for e in recorder.events if isinstance(e, Step)]
    assert [(e.step, e.total) for e in steps] == [(1, 4), (2, 4), (3, 4), (4, 4)]
    assert [e.latents is not None for e in steps] == [False, True, False, True]
    assert all(a.elapsed_s <= b.elapsed_s for a, b in zip(steps, steps[1:], strict=False))


def test_cancelled_request_leaves_within_one_step(parts):
    _, denoiser, _ = parts
    engine = DenoiseEngine(denoiser.unet)
    a, rec_a = _job(parts, "a", steps=20)
    b, rec_b = _job(parts, "b", steps=20, seeds=(1,))
    engine.submit(a)
    engine.submit(b)
    assert engine.step().request_ids == ("a", "b")
    assert engine.step().request_ids == ("a", "b")
    engine.cancel("a")
    assert engine.step().request_ids == ("b",)  # the very next forward
    assert isinstance(rec_a.events[-1], Cancelled)
    assert not any(isinstance(e, Finished) for e in rec_a.events)
    assert engine.counts() == (0, 1)
    _run(engine)
    assert isinstance(rec_b.events[-1], Finished)


def test_deadline_and_cancel_while_waiting(parts):
    _, denoiser, _ = parts
    engine = DenoiseEngine(denoiser.unet, max_batch_size=1)
    late, rec_late = _job(parts, "late", deadline=0.0)  # already past
    waiting, rec_waiting = _job(parts, "waiting")
    engine.submit(late)
    engine.submit(waiting)
    engine.cancel("waiting")
    assert engine.step() is None
    assert rec_late.events[-1] == Cancelled(reason="deadline exceeded")
    assert isinstance(rec_waiting.events[-1], Cancelled)
    assert engine.counts() == (0, 0)


def test_buckets_take_turns_and_respect_the_batch_cap(parts):
    _, denoiser, _ = parts
    engine = DenoiseEngine(denoiser.unet, max_batch_size=2)
    for i in range(3):
        engine.submit(_job(parts, f"sq{i}", steps=3, seeds=(i,))[0])
    engine.submit(_job(parts, "wide", steps=3, width=128, height=64)[0])
    stats = _run(engine)
    shapes = [s.latent_shape[-2:] for s in stats]
    assert shapes[:2] == [(8, 8), (8, 16)]  # round robin between the two buckets
    assert max(s.batch_size for s in stats) == 2
    assert stats[0].request_ids == ("sq0", "sq1") and stats[0].waiting == 1
    # sq2 joined as soon as sq0/sq1 left, while "wide" was still running
    assert any(s.request_ids == ("sq2",) for s in stats)


def test_request_level_strategy_does_not_admit_into_a_running_batch(parts):
    _, denoiser, _ = parts
    for strategy, joins_early in (("request", False), ("step", True)):
        engine = DenoiseEngine(denoiser.unet, strategy=strategy)
        engine.submit(_job(parts, "first", steps=4)[0])
        engine.step()
        engine.submit(_job(parts, "second", steps=4, seeds=(1,))[0])
        ids = engine.step().request_ids
        assert ("second" in ids) is joins_early, strategy
        _run(engine)


def test_runs_on_an_executor_between_other_tasks(parts):
    """Started on a single-thread executor, the engine runs each step as a task there, so work
    queued on the same thread (preparing requests, decoding) runs between two steps."""
    from concurrent.futures import ThreadPoolExecutor

    _, denoiser, _ = parts
    torch_thread = ThreadPoolExecutor(max_workers=1)
    engine = DenoiseEngine(denoiser.unet)
    engine.start(torch_thread)
    try:
        done = threading.Event()
        job, recorder = _job(parts, "r", steps=30)
        job.on_event = lambda e: (recorder(e), isinstance(e, Finished) and done.set())
        torch_thread.submit(engine.submit, job)
        while not any(isinstance(e, Step) for e in recorder.events):
            assert not done.is_set()
        steps_seen = torch_thread.submit(
            lambda: sum(isinstance(e, Step) for e in recorder.events)
        ).result(timeout=30)
        assert 0 < steps_seen < 30  # it ran while the request was mid-way
        assert done.wait(30)
        # Bit for bit only with the same thread count on both threads: allow rounding.
        assert torch.allclose(recorder.latents, _solo(parts, steps=30), atol=1e-4)
        assert engine.counts() == (0, 0)
    finally:
        engine.stop()
        torch_thread.shutdown()


class FailingUNet(torch.nn.Module):
    """The tiny U-Net, but forwards numbered in `fail_at` raise `error` (fault injection)."""

    def __init__(self, unet, fail_at, error):
        super().__init__()
        self.unet, self.fail_at, self.error, self.calls = unet, set(fail_at), error, 0

    @property
    def dtype(self):  # what the step casts its input to, as diffusers' ModelMixin has
        return self.unet.dtype

    def forward(self, *args, **kwargs):
        self.calls += 1
        if self.calls in self.fail_at:
            raise self.error
        return self.unet(*args, **kwargs)


@pytest.mark.parametrize("error", [RuntimeError("boom"), torch.OutOfMemoryError("out of memory")])
def test_a_failed_forward_fails_only_the_requests_in_it(parts, error):
    """Two buckets take turns; the second forward (the wide bucket's first) raises: its request
    fails with the error, the square one finishes with its solo pixels."""
    from sdserve.pipeline.engine import Failed, is_out_of_memory

    _, denoiser, _ = parts
    engine = DenoiseEngine(FailingUNet(denoiser.unet, {2}, error))
    square, rec_square = _job(parts, "square", steps=4)
    wide, rec_wide = _job(parts, "wide", steps=4, width=128)
    engine.submit(square)
    engine.submit(wide)
    _run(engine)
    assert isinstance(rec_wide.events[-1], Failed) and rec_wide.events[-1].error is error
    assert is_out_of_memory(error) == isinstance(error, torch.OutOfMemoryError)
    assert _max_pixel_diff(parts, _solo(parts, steps=4), rec_square.latents) <= 2
    assert engine.counts() == (0, 0)


def test_a_raising_callback_costs_no_other_request_its_result(parts):
    _, denoiser, _ = parts
    engine = DenoiseEngine(denoiser.unet)
    good, rec_good = _job(parts, "good", steps=5)
    bad, rec_bad = _job(parts, "bad", steps=5, seeds=(1,))

    def raising(event):
        rec_bad(event)
        if isinstance(event, Step):
            raise ValueError("a broken consumer")

    bad.on_event = raising
    engine.submit(good)
    engine.submit(bad)
    _run(engine)
    assert isinstance(rec_good.events[-1], Finished)
    assert _max_pixel_diff(parts, _solo(parts, steps=5), rec_good.latents) <= 2
    assert isinstance(rec_bad.events[-1], Cancelled)  # dropped at the next step boundary
    assert sum(isinstance(e, Step) for e in rec_bad.events) == 1


def test_an_engine_error_fails_every_pending_request_instead_of_hanging(parts, monkeypatch):
    from concurrent.futures import ThreadPoolExecutor

    from sdserve.pipeline.engine import Failed

    _, denoiser, _ = parts
    engine = DenoiseEngine(denoiser.unet)
    jobs = [_job(parts, f"r{i}", steps=3, seeds=(i,)) for i in range(3)]

    def broken(now):
        raise KeyError("a bug in admission")

    monkeypatch.setattr(engine, "_admit", broken)
    torch_thread = ThreadPoolExecutor(max_workers=1)
    engine.start(torch_thread)
    try:
        for job, _ in jobs:
            engine.submit(job)
        deadline = time.monotonic() + 10
        while not all(isinstance(r.events[-1], Failed) for _, r in jobs):
            assert time.monotonic() < deadline, [r.events for _, r in jobs]
            time.sleep(0.01)
        assert engine.counts() == (0, 0)
        assert all(isinstance(r.events[-1].error, KeyError) for _, r in jobs)
    finally:
        engine.stop()
        torch_thread.shutdown()
