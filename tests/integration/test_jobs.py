"""Asynchronous jobs end to end: gRPC -> Redis -> JobWorker replicas -> the stages -> Redis.

The server fixture runs two JobWorker replicas (4 jobs each at a time) with a 2 s lease on the
session's own redis-server (append-only file on, fsync always).
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
from helpers import denoiser_stats, sdserve_cli

from sdserve.v1 import diffusion_pb2

pytestmark = pytest.mark.integration

QUICK = dict(prompt="a job", width=32, height=32, steps=2, guidance_scale=1.0, scheduler="ddim")
ENDED = {diffusion_pb2.JOB_STATE_SUCCEEDED, diffusion_pb2.JOB_STATE_FAILED,
         diffusion_pb2.JOB_STATE_CANCELLED}  # fmt: skip


def _submit(stub, priority=diffusion_pb2.JOB_PRIORITY_UNSPECIFIED, key="", **fields):
    request = diffusion_pb2.GenerateRequest(**{**QUICK, **fields})
    return stub.SubmitJob(
        diffusion_pb2.SubmitJobRequest(request=request, priority=priority, idempotency_key=key),
        timeout=30,
    )


def _get(stub, job_id):
    return stub.GetJob(diffusion_pb2.GetJobRequest(job_id=job_id), timeout=30)


def _wait(stub, job_ids, timeout_s=180.0):
    """Polls until every job has ended; returns {id: Job}."""
    deadline = time.monotonic() + timeout_s
    done = {}
    while len(done) < len(job_ids):
        for job_id in job_ids:
            if job_id not in done:
                job = _get(stub, job_id)
                if job.state in ENDED:
                    done[job_id] = job
        if time.monotonic() > deadline:
            left = [_get(stub, j) for j in job_ids if j not in done][:3]
            raise AssertionError(f"{len(job_ids) - len(done)} jobs not ended, e.g. {left}")
        time.sleep(0.1)
    return done


def _wait_running(stub, job_id, min_step, timeout_s=60.0):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        job = _get(stub, job_id)
        if job.state == diffusion_pb2.JOB_STATE_RUNNING and job.step >= min_step:
            return job
        assert job.state not in ENDED, job
        time.sleep(0.02)
    raise AssertionError(f"job {job_id} never reached step {min_step}: {job}")


def _queue(server):
    from sdserve.jobs.queue import JobQueue

    return JobQueue.from_config(server.config.jobs)


def _events(server, job_id):
    """The job's events stream, as (state, step) pairs."""

    async def read():
        queue = _queue(server)
        try:
            entries = await queue.redis.xrange(queue.keys.events(job_id))
        finally:
            await queue.close()
        return [(f[b"state"].decode(), int(f[b"step"])) for _, f in entries]

    return asyncio.run(read())


def test_a_job_makes_the_same_images_as_generate(stub):
    """A job runs the same stage path as Generate: same request and seed, same PNG bytes."""
    fields = dict(QUICK, steps=3, seed=1234, num_images=2, guidance_scale=7.5, width=64)
    job_id = _submit(stub, **fields).job_id
    job = _wait(stub, [job_id])[job_id]
    assert job.state == diffusion_pb2.JOB_STATE_SUCCEEDED, job.error
    assert job.attempts == 1 and job.step == job.total_steps == 3
    assert 0 < job.created_at <= job.started_at <= job.finished_at
    direct = stub.Generate(diffusion_pb2.GenerateRequest(**fields), timeout=60)
    assert [i.png for i in job.result.images] == [i.png for i in direct.images]
    assert [i.seed for i in job.result.images] == [1234, 1235]


def test_an_unset_seed_is_fixed_when_the_job_is_queued(stub):
    """So that a job run twice (its worker died) makes the same images."""
    job_id = _submit(stub).job_id
    job = _wait(stub, [job_id])[job_id]
    seed = job.result.images[0].seed
    again = stub.Generate(diffusion_pb2.GenerateRequest(**QUICK, seed=seed), timeout=60)
    assert job.result.images[0].png == again.images[0].png


def test_200_concurrent_jobs_all_succeed_exactly_once(stub, server):
    """200 SubmitJob calls at once: 200 distinct ids, all SUCCEEDED at the first attempt, each
    with one stored result (its events record exactly one SUCCEEDED)."""
    with ThreadPoolExecutor(32) as pool:
        replies = list(pool.map(lambda i: _submit(stub, seed=i), range(200)))
    ids = [r.job_id for r in replies]
    assert len(set(ids)) == 200 and all(r.created for r in replies)
    jobs = _wait(stub, ids, timeout_s=300)
    states = {diffusion_pb2.JobState.Name(j.state) for j in jobs.values()}
    assert states == {"JOB_STATE_SUCCEEDED"}
    assert {j.attempts for j in jobs.values()} == {1}
    for job_id, job in jobs.items():
        assert len(job.result.images) == 1 and job.result.images[0].png.startswith(b"\x89PNG")
        assert [s for s, _ in _events(server, job_id)].count("SUCCEEDED") == 1
    workers = {j.worker for j in jobs.values()}
    assert len(workers) == 2, f"both JobWorker replicas should have taken jobs: {workers}"


def test_a_worker_killed_mid_job_hands_it_over(stub):
    """SIGKILL the JobWorker process running a job: another worker takes it over after the
    lease and it completes once, with attempts = 2, making the images it would have made."""
    fields = dict(QUICK, steps=60, width=64, height=64, seed=77)
    job_id = _submit(stub, **fields).job_id
    running = _wait_running(stub, job_id, min_step=2)
    pid = int(running.worker.split(":")[1])
    assert pid != os.getpid()
    os.kill(pid, signal.SIGKILL)
    job = _wait(stub, [job_id])[job_id]
    assert job.state == diffusion_pb2.JOB_STATE_SUCCEEDED, job.error
    assert job.attempts == 2
    assert job.worker != running.worker
    direct = stub.Generate(diffusion_pb2.GenerateRequest(**fields), timeout=120)
    assert job.result.images[0].png == direct.images[0].png


def test_cancel_a_running_and_a_queued_job(stub, server):
    """A running job stops within a step of CancelJob and is never decoded; a queued one ends
    CANCELLED at once and never starts."""
    long = dict(QUICK, steps=150, width=64, height=64)
    # More long jobs than the workers' 8 slots, then a low-priority one that must wait.
    busy = [_submit(stub, **long).job_id for _ in range(12)]
    queued = _submit(stub, priority=diffusion_pb2.JOB_PRIORITY_LOW).job_id
    assert _get(stub, queued).state == diffusion_pb2.JOB_STATE_QUEUED
    cancelled = stub.CancelJob(diffusion_pb2.GetJobRequest(job_id=queued), timeout=30)
    assert cancelled.state == diffusion_pb2.JOB_STATE_CANCELLED

    target = busy[0]
    before = _wait_running(stub, target, min_step=3)
    reply = stub.CancelJob(diffusion_pb2.GetJobRequest(job_id=target), timeout=30)
    assert reply.cancel_requested
    at_cancel = max(reply.step, before.step)
    job = _wait(stub, [target], timeout_s=60)[target]
    assert job.state == diffusion_pb2.JOB_STATE_CANCELLED
    assert not job.HasField("result")
    steps = [step for state, step in _events(server, target) if state == "RUNNING"]
    # The step running when the request arrived may finish; none after it.
    assert max(steps) <= at_cancel + 2, (at_cancel, steps)

    for job_id in busy[1:]:
        stub.CancelJob(diffusion_pb2.GetJobRequest(job_id=job_id), timeout=30)
    jobs = _wait(stub, busy, timeout_s=60)
    assert {j.state for j in jobs.values()} == {diffusion_pb2.JOB_STATE_CANCELLED}
    never = _get(stub, queued)
    assert never.state == diffusion_pb2.JOB_STATE_CANCELLED
    assert never.attempts == 0 and never.started_at == 0


def test_the_same_idempotency_key_gives_one_job(stub):
    first = _submit(stub, key="order-42")
    again = _submit(stub, key="order-42", prompt="a different prompt")
    assert first.created and not again.created
    assert again.job_id == first.job_id
    assert _submit(stub, key="order-43").job_id != first.job_id


def test_watch_job_streams_steps_until_the_result(stub):
    job_id = _submit(stub, steps=8, width=64, height=64).job_id
    seen = list(stub.WatchJob(diffusion_pb2.GetJobRequest(job_id=job_id), timeout=120))
    assert seen[-1].state == diffusion_pb2.JOB_STATE_SUCCEEDED
    assert len(seen[-1].result.images) == 1
    assert not any(j.HasField("result") for j in seen[:-1])
    running = [j.step for j in seen if j.state == diffusion_pb2.JOB_STATE_RUNNING]
    assert running == sorted(running) and any(0 < s < 8 for s in running), running


def test_bad_job_requests_get_clear_errors(stub):
    with pytest.raises(grpc.RpcError) as err:
        _submit(stub, steps=0)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.value.details().startswith("request.steps")
    with pytest.raises(grpc.RpcError) as err:
        stub.SubmitJob(diffusion_pb2.SubmitJobRequest(), timeout=30)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.value.details().startswith("request:")
    with pytest.raises(grpc.RpcError) as err:
        _get(stub, "no-such-job")
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.RpcError) as err:
        _get(stub, "")
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "job_id" in err.value.details()


def test_redis_restart_keeps_queued_jobs(stub, redis_server):
    """Kill Redis (SIGKILL) with jobs running and queued: while it is down SubmitJob answers
    UNAVAILABLE and Generate still serves; after it restarts every job completes."""
    ids = [_submit(stub, steps=20, width=64, height=64, seed=i).job_id for i in range(16)]
    _wait_running(stub, ids[0], min_step=1)
    redis_server.kill()
    try:
        with pytest.raises(grpc.RpcError) as err:
            _submit(stub)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "redis-server" in err.value.details()
        with pytest.raises(grpc.RpcError) as err:
            _get(stub, ids[0])
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        assert stub.Generate(diffusion_pb2.GenerateRequest(**QUICK), timeout=60).images
    finally:
        redis_server.start()
    jobs = _wait(stub, ids, timeout_s=240)
    assert {j.state for j in jobs.values()} == {diffusion_pb2.JOB_STATE_SUCCEEDED}
    after = _submit(stub).job_id
    assert _wait(stub, [after])[after].state == diffusion_pb2.JOB_STATE_SUCCEEDED


def test_cli_submit_and_wait_for_a_job(server, stub, tmp_path):
    """`sdserve submit` prints the id; `sdserve job ID --wait -o FILE` writes the images."""
    opts = ["--server", server.target, "--seed", "9", "--steps", "2", "--width", "32",
            "--height", "32", "--guidance", "1", "--scheduler", "ddim"]  # fmt: skip
    submit = sdserve_cli("submit", "a job", *opts, "--priority", "high")
    assert submit.returncode == 0, submit.stderr
    job_id = submit.stdout.strip()
    out = tmp_path / "job.png"
    wait = sdserve_cli("job", job_id, "--server", server.target, "--wait", "-q", "-o", str(out))
    assert wait.returncode == 0, wait.stderr
    assert f"{job_id}: SUCCEEDED" in wait.stdout
    direct = stub.Generate(diffusion_pb2.GenerateRequest(**{**QUICK, "seed": 9}), timeout=60)
    assert out.read_bytes() == direct.images[0].png
    assert _get(stub, job_id).priority == diffusion_pb2.JOB_PRIORITY_HIGH

    again = sdserve_cli("submit", "a job", *opts, "--idempotency-key", f"cli-{job_id}")
    same = sdserve_cli("submit", "a job", *opts, "--idempotency-key", f"cli-{job_id}")
    assert again.stdout == same.stdout and "existing job" in same.stderr

    missing = sdserve_cli("job", "nope", "--server", server.target)
    assert missing.returncode == 2
    assert missing.stderr.startswith("NOT_FOUND: job_id: ")


def test_a_job_longer_than_the_lease_runs_once(stub, server):
    """The worker renews its 2 s lease while a job of several seconds runs: nobody takes it
    over, so it starts once (one RUNNING event at step 0) and ends at attempt 1."""
    started = time.monotonic()
    job_id = _submit(stub, steps=150, width=192, height=192).job_id
    job = _wait(stub, [job_id])[job_id]
    took = time.monotonic() - started
    assert took > 1.5 * server.config.jobs.lease_s, f"the job took only {took:.1f}s"
    assert job.state == diffusion_pb2.JOB_STATE_SUCCEEDED and job.attempts == 1
    assert _events(server, job_id).count(("RUNNING", 0)) == 1


def test_generate_pauses_a_running_job_which_resumes_to_the_same_image(stub, server):
    """Interactive before bulk (`engine.scheduling: priority`): a Generate call made while a job
    runs has the U-Net's forwards to itself; the job pauses at a step boundary and resumes when
    the call is done, its images those of the same request run unpaused, its paused time in
    its timings."""
    fields = dict(QUICK, steps=80, width=64, height=64, seed=77)
    job_id = _submit(stub, **fields).job_id
    _wait_running(stub, job_id, min_step=2)
    before = denoiser_stats(server.config.server.app_name)
    steps = 30
    stub.Generate(diffusion_pb2.GenerateRequest(**{**QUICK, "steps": steps, "width": 64,
                                                   "height": 64}), timeout=60)  # fmt: skip
    after = denoiser_stats(server.config.server.app_name)
    assert _get(stub, job_id).state == diffusion_pb2.JOB_STATE_RUNNING, "the job ended too soon"
    # The call's forwards held it alone: none shared with the job, which was paused for it.
    assert after.shared_steps == before.shared_steps
    assert after.preemptions - before.preemptions >= 1
    assert steps <= after.unet_steps - before.unet_steps
    job = _wait(stub, [job_id])[job_id]
    assert job.state == diffusion_pb2.JOB_STATE_SUCCEEDED, job.error
    timings = job.result.timings
    assert 0 < timings.denoiser_paused_s < timings.denoiser_s
    unpaused = stub.Generate(diffusion_pb2.GenerateRequest(**fields), timeout=60)
    assert unpaused.timings.denoiser_paused_s == 0
    assert [i.png for i in job.result.images] == [i.png for i in unpaused.images]
