"""Chaos (issue 27): sdserve under load while its stage replicas are SIGKILLed.

    make chaos                                                        # 3 minutes
    SDSERVE_CHAOS_S=60 .venv/bin/pytest -m chaos tests/chaos -s       # a shorter try

For SDSERVE_CHAOS_S seconds (default 180), 16 clients send Generate with 60 s deadlines and a job
of 50 steps is submitted every 10 s, while every 30 s the test SIGKILLs the process of one stage
replica (TextEncoder, VaeEncoder, Denoiser or VaeDecoder: each once before any twice, in an
order drawn from SDSERVE_CHAOS_SEED). It asserts issue 27's must-show:

- every request ends within its deadline + 5 s, OK or with a clean status: a code the API
  documents for a server that cannot serve now (UNAVAILABLE, DEADLINE_EXCEEDED,
  RESOURCE_EXHAUSTED), with a message; never INTERNAL or UNKNOWN;
- health (grpc.health.v1 Check, polled every 0.25 s) goes NOT_SERVING within 5 s of each kill
  and SERVING again once Serve has restored the replica (before the next kill);
- every job ends SUCCEEDED.

It prints a report: requests by status code, the largest overrun past a deadline, each kill
with health's delays, and the jobs' states and attempts.
"""

from __future__ import annotations

import os
import random
import re
import signal
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from sdserve.v1 import diffusion_pb2, diffusion_pb2_grpc

pytestmark = pytest.mark.chaos

DURATION_S = float(os.environ.get("SDSERVE_CHAOS_S", "180"))
SEED = int(os.environ.get("SDSERVE_CHAOS_SEED", "27"))
CLIENTS, DEADLINE_S, GRACE_S = 16, 60.0, 5.0
KILL_EVERY_S, NOT_SERVING_WITHIN_S, RESTORE_WITHIN_S = 30.0, 5.0, 120.0
JOB_EVERY_S, JOB_WAIT_S = KILL_EVERY_S / 3, 300.0
JOBS = int(DURATION_S // JOB_EVERY_S)
STAGES = ("TextEncoder", "VaeEncoder", "Denoiser", "VaeDecoder")
CLEAN = {"OK", "UNAVAILABLE", "DEADLINE_EXCEEDED", "RESOURCE_EXHAUSTED"}
REQUEST = dict(width=32, height=32, steps=4, guidance_scale=7.5, scheduler="ddim")
JOB_REQUEST = {**REQUEST, "steps": 50}  # seconds under the load: a kill lands on a running job
ENDED = {diffusion_pb2.JOB_STATE_SUCCEEDED, diffusion_pb2.JOB_STATE_FAILED,
         diffusion_pb2.JOB_STATE_CANCELLED}  # fmt: skip


@dataclass
class Call:
    started: float
    ended: float
    code: str
    details: str

    @property
    def elapsed(self) -> float:
        return self.ended - self.started


@dataclass
class Kill:
    at: float
    stage: str
    pid: int
    down_s: float | None = None  # kill -> first NOT_SERVING
    restored_s: float | None = None  # kill -> SERVING again


def replica_pids(sid: int, stage: str) -> list[int]:
    """Live processes of session `sid` titled `ray::ServeReplica:sdserve:<stage>` (with
    `.<method>` while Ray runs one of its tasks: `...:TextEncoder.initialize_and_get_metadata`)."""
    title = re.compile(rf"ray::ServeReplica:sdserve:{stage}(\.\w+)?")
    pids = []
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            stat = (proc / "stat").read_text().rsplit(")", 1)[1].split()
            cmdline = (proc / "cmdline").read_bytes().split(b"\0")[0].decode(errors="replace")
        except OSError:
            continue
        if int(stat[3]) == sid and stat[0] != "Z" and title.fullmatch(cmdline.strip()):
            pids.append(int(proc.name))
    return pids


@dataclass
class HealthLog:
    """Polls Check("") every 0.25 s in a thread; keeps each change of status with its time."""

    target: str
    changes: list[tuple[float, str]] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)

    def run(self) -> None:
        with grpc.insecure_channel(self.target) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            while not self.stop.wait(0.25):
                try:
                    reply = stub.Check(health_pb2.HealthCheckRequest(), timeout=3)
                    status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
                except grpc.RpcError as exc:
                    status = f"error {exc.code().name}"
                if not self.changes or self.changes[-1][1] != status:
                    self.changes.append((time.monotonic(), status))

    def status(self) -> str:
        return self.changes[-1][1] if self.changes else "unknown"

    def wait_serving(self, timeout_s: float) -> bool:
        deadline = time.monotonic() + timeout_s
        while self.status() != "SERVING" and time.monotonic() < deadline:
            time.sleep(0.1)
        return self.status() == "SERVING"

    def first(self, after: float, serving: bool) -> float | None:
        """When health first said SERVING (or anything else) at or after `after`."""
        return next((t for t, s in self.changes if t >= after and (s == "SERVING") == serving),
                    None)  # fmt: skip


def client_loop(target: str, number: int, stop_at: float, calls: list[Call]) -> None:
    """Generate with a 60 s deadline, one call after another, until `stop_at`."""
    with grpc.insecure_channel(target) as channel:
        stub = diffusion_pb2_grpc.DiffusionServiceStub(channel)
        for i in range(100_000):  # bounded; the clock ends it long before
            if time.monotonic() >= stop_at:
                return
            request = diffusion_pb2.GenerateRequest(prompt=f"client {number}", seed=i, **REQUEST)
            started = time.monotonic()
            try:
                stub.Generate(request, timeout=DEADLINE_S)
                code, details = "OK", ""
            except grpc.RpcError as exc:
                code, details = exc.code().name, exc.details() or ""
            calls.append(Call(started, time.monotonic(), code, details))


def submit_jobs(target: str, t0: float, job_ids: list[str], errors: list[str]) -> None:
    """A job every JOB_EVERY_S, half a second before each mark: every third just before a
    kill, so that it is running when the kill lands."""
    with grpc.insecure_channel(target) as channel:
        stub = diffusion_pb2_grpc.DiffusionServiceStub(channel)
        for i in range(JOBS):
            time.sleep(max(0.0, t0 + (i + 1) * JOB_EVERY_S - 0.5 - time.monotonic()))
            request = diffusion_pb2.GenerateRequest(prompt=f"job {i}", seed=i, **JOB_REQUEST)
            try:
                reply = stub.SubmitJob(diffusion_pb2.SubmitJobRequest(request=request), timeout=30)
                job_ids.append(reply.job_id)
            except grpc.RpcError as exc:
                errors.append(f"job {i}: {exc.code().name} {exc.details()}")


def kill_loop(sid: int, health: HealthLog, t0: float, rng: random.Random) -> list[Kill]:
    """Every KILL_EVERY_S, once health says SERVING, SIGKILLs one stage replica's process."""
    order = [*rng.sample(STAGES, len(STAGES)), *rng.choices(STAGES, k=100)]
    kills: list[Kill] = []
    while (at := t0 + KILL_EVERY_S * (len(kills) + 1)) < t0 + DURATION_S:
        time.sleep(max(0.0, at - time.monotonic()))
        if not health.wait_serving(RESTORE_WITHIN_S):
            break  # the last kill's stage never came back: the assertions say so
        stage = order[len(kills)]
        pids = replica_pids(sid, stage)
        assert len(pids) == 1, f"{stage}: replica processes {pids}"
        os.kill(pids[0], signal.SIGKILL)
        kills.append(Kill(time.monotonic(), stage, pids[0]))
    return kills


def wait_jobs(target: str, job_ids: list[str]) -> dict[str, diffusion_pb2.Job]:
    """Each job as it ended (or as it was when JOB_WAIT_S ran out)."""
    jobs: dict[str, diffusion_pb2.Job] = {}
    deadline = time.monotonic() + JOB_WAIT_S
    with grpc.insecure_channel(target) as channel:
        stub = diffusion_pb2_grpc.DiffusionServiceStub(channel)
        while time.monotonic() < deadline:
            for job_id in job_ids:
                if job_id not in jobs or jobs[job_id].state not in ENDED:
                    jobs[job_id] = stub.GetJob(diffusion_pb2.GetJobRequest(job_id=job_id),
                                               timeout=30)  # fmt: skip
            if all(job.state in ENDED for job in jobs.values()):
                break
            time.sleep(1.0)
    return jobs


def report(calls: list[Call], kills: list[Kill], health: HealthLog, t0: float,
           jobs: dict, problems: list[str]) -> str:  # fmt: skip
    codes = Counter(c.code for c in calls)
    slowest = max(calls, key=lambda c: c.elapsed, default=None)
    lines = [
        f"chaos: {DURATION_S:.0f} s, {CLIENTS} clients, deadline {DEADLINE_S:.0f} s, "
        f"kill every {KILL_EVERY_S:.0f} s, seed {SEED}",
        f"requests: {len(calls)}; by code: {dict(codes.most_common())}",
        f"longest request {slowest.elapsed:.2f} s ({slowest.code}); overrun past its deadline "
        f"{slowest.elapsed - DEADLINE_S:+.2f} s"
        if slowest
        else "no requests",
    ]
    for code in sorted(set(codes) - {"OK"}):
        example = next(c for c in calls if c.code == code)
        lines.append(f"  e.g. {code} after {example.elapsed:.2f} s: {example.details[:200]}")
    for k in kills:
        down = f"{k.down_s:.2f} s" if k.down_s is not None else "never"
        up = f"{k.restored_s:.2f} s" if k.restored_s is not None else "never"
        lines.append(f"kill at {k.at - t0:6.1f} s: {k.stage} (pid {k.pid}); NOT_SERVING after "
                     f"{down}, SERVING again after {up}")  # fmt: skip
    lines.append("health: " + ", ".join(f"{t - t0:.1f}s {s}" for t, s in health.changes))
    states = Counter(diffusion_pb2.JobState.Name(j.state) for j in jobs.values())
    attempts = Counter(j.attempts for j in jobs.values())
    lines.append(f"jobs: {len(jobs)} submitted, {dict(states)}; attempts {dict(attempts)}; "
                 f"problems (failed SubmitJob, hung threads) {problems or 'none'}")  # fmt: skip
    for job in jobs.values():
        if job.state != diffusion_pb2.JOB_STATE_SUCCEEDED:
            lines.append(f"  job {job.job_id}: {diffusion_pb2.JobState.Name(job.state)} "
                         f"after {job.attempts} attempt(s): {job.error}")  # fmt: skip
    return "\n".join(lines)


def run_chaos(server) -> tuple[list[Call], list[Kill], HealthLog, float, dict, list[str]]:
    """The load, the jobs and the kills, then the restoration and the jobs' ends."""
    health = HealthLog(server.target)
    threading.Thread(target=health.run, daemon=True).start()
    assert health.wait_serving(60), health.changes
    t0 = time.monotonic()
    calls: list[Call] = []
    job_ids: list[str] = []
    problems: list[str] = []
    stop_at = t0 + DURATION_S
    threads = [
        threading.Thread(target=client_loop, args=(server.target, n, stop_at, calls), daemon=True)
        for n in range(CLIENTS)
    ]
    jobs_args = (server.target, t0, job_ids, problems)
    threads.append(threading.Thread(target=submit_jobs, args=jobs_args, daemon=True))
    for thread in threads:
        thread.start()
    try:
        kills = kill_loop(server.proc.pid, health, t0, random.Random(SEED))
    finally:
        for thread in threads:  # a call ends by its deadline: joining longer means a hang
            thread.join(timeout=max(0.0, t0 + DURATION_S + DEADLINE_S + 30 - time.monotonic()))
    health.wait_serving(RESTORE_WITHIN_S)
    for i, kill in enumerate(kills):
        until = kills[i + 1].at if i + 1 < len(kills) else float("inf")
        down = health.first(kill.at, serving=False)
        kill.down_s = down - kill.at if down is not None and down < until else None
        up = health.first(down, serving=True) if down is not None else None
        kill.restored_s = up - kill.at if up is not None and up < until else None
    jobs = wait_jobs(server.target, job_ids)
    health.stop.set()
    if hung := sum(t.is_alive() for t in threads):  # a client (or the submitter) in a call
        problems.append(f"{hung} thread(s) still in a call")
    return calls, kills, health, t0, jobs, problems


@pytest.mark.timeout(DURATION_S + 900)
def test_stage_replicas_killed_under_load(chaos_server):
    calls, kills, health, t0, jobs, problems = run_chaos(chaos_server)
    text = report(calls, kills, health, t0, jobs, problems)
    print("\n" + text, flush=True)
    context = f"{text}\n--- server log ends:\n{chaos_server.tail(80)}"

    assert kills and len(kills) == int((DURATION_S - 1e-9) // KILL_EVERY_S), context
    assert calls and any(c.code == "OK" for c in calls), context
    late = [c for c in calls if c.elapsed > DEADLINE_S + GRACE_S]
    assert not late, f"{len(late)} request(s) past deadline + {GRACE_S:g} s\n{context}"
    unclean = [c for c in calls if c.code not in CLEAN or (c.code != "OK" and not c.details)]
    assert not unclean, f"{len(unclean)} request(s) not OK nor clean: {unclean[:5]}\n{context}"
    for kill in kills:
        assert kill.down_s is not None and kill.down_s <= NOT_SERVING_WITHIN_S, context
        assert kill.restored_s is not None, context
    assert not problems and len(jobs) == JOBS, context
    assert all(j.state == diffusion_pb2.JOB_STATE_SUCCEEDED for j in jobs.values()), context
