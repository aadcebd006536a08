"""bench_slo's scenarios with bulk jobs: interactive requests over a backlog of jobs (under
each `engine.scheduling`), and one tenant's flood of jobs under another tenant's interactive
requests.

A `Backlog` keeps jobs queued ahead of the Denoiser for as long as it is open (bounded by a
number of jobs), and cancels what is left when it closes. The jobs' throughput is read from the
Denoiser's counters: image-steps over a window, less the interactive requests' own (each
finished inside the window), over the bulk request's steps.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass, field

import grpc
from slo_servers import Servers, denoiser_counters, sender

from sdserve.loadtest import Mix, Report, drive
from sdserve.loadtest.slo import assign_slos
from sdserve.v1 import diffusion_pb2, diffusion_pb2_grpc


async def counters() -> dict[str, float]:
    return await asyncio.to_thread(denoiser_counters)


@dataclass
class Backlog:
    """Bulk jobs of `request` (seeds counting up) kept `ahead` queued or running beyond what
    the Denoiser has done, at most `max_jobs` submitted; cancelled on close."""

    stub: diffusion_pb2_grpc.DiffusionServiceStub
    metadata: tuple
    request: diffusion_pb2.GenerateRequest
    ahead: int
    max_jobs: int
    ids: list[str] = field(default_factory=list)
    low: float = float("inf")
    """The fewest jobs outstanding seen since `watch()` (counting interactive image-steps as
    bulk ones: an underestimate); below the job slots, the backlog ran dry."""

    async def __aenter__(self) -> Backlog:
        self.start = (await counters()).get("image_steps", 0.0)
        await self.submit(self.ahead)
        self.task = asyncio.create_task(self._keep())
        return self

    async def __aexit__(self, *exc) -> None:
        self.task.cancel()
        await asyncio.gather(self.task, return_exceptions=True)
        await self._each(
            lambda i: self.stub.CancelJob(
                diffusion_pb2.GetJobRequest(job_id=i), metadata=self.metadata, timeout=30
            )
        )

    def watch(self) -> None:
        self.low = float("inf")

    async def submit(self, n: int) -> None:
        n = min(n, self.max_jobs - len(self.ids))
        seeds = range(len(self.ids), len(self.ids) + n)

        async def one(seed: int) -> str:
            request = diffusion_pb2.GenerateRequest()
            request.CopyFrom(self.request)
            request.seed = seed
            submit = diffusion_pb2.SubmitJobRequest(request=request)
            return (await self.stub.SubmitJob(submit, metadata=self.metadata, timeout=30)).job_id

        for chunk in range(0, n, 32):
            self.ids += await asyncio.gather(*(one(s) for s in seeds[chunk : chunk + 32]))

    async def _keep(self) -> None:
        while True:
            await asyncio.sleep(0.5)
            done = ((await counters()).get("image_steps", 0.0) - self.start) / self.request.steps
            outstanding = len(self.ids) - done
            self.low = min(self.low, outstanding)
            if outstanding < self.ahead:
                await self.submit(int(self.ahead - outstanding) + 1)

    async def _each(self, call) -> None:
        for chunk in range(0, len(self.ids), 64):
            await asyncio.gather(
                *(call(i) for i in self.ids[chunk : chunk + 64]), return_exceptions=True
            )  # ended jobs: nothing to cancel

    async def succeeded(self) -> int:
        """Jobs that finished with their images."""
        states = []

        async def one(job_id: str) -> None:
            job = await self.stub.GetJob(
                diffusion_pb2.GetJobRequest(job_id=job_id), metadata=self.metadata, timeout=30
            )
            states.append(job.state)

        await self._each(one)
        return states.count(diffusion_pb2.JOB_STATE_SUCCEEDED)


async def wait_running(timeout_s: float = 60.0) -> None:
    """Until the Denoiser runs something, and two seconds more (the batch fills)."""
    deadline = time.monotonic() + timeout_s
    while (await counters()).get("running", 0.0) < 1 and time.monotonic() < deadline:
        await asyncio.sleep(0.25)
    await asyncio.sleep(2.0)


GAUGES = ("waiting", "running", "paused", "work_ahead", "interactive_work_ahead", "capacity",
          "unet_busy_ratio")  # fmt: skip
"""DenoiserStats fields that are readings, not counters: a window reports no change of them."""


@dataclass
class Window:
    """The Denoiser's counters over a stretch of the run (`window()`)."""

    before: dict
    after: dict = field(default_factory=dict)
    seconds: float = 0.0

    def grew(self) -> dict[str, float]:
        """Each counter's growth (those that grew)."""
        names = sorted({*self.before, *self.after} - set(GAUGES))
        grew = {k: self.after.get(k, 0.0) - self.before.get(k, 0.0) for k in names}
        return {k: v for k, v in grew.items() if v}

    @property
    def busy(self) -> float:
        """The U-Net's share of the window."""
        return self.grew().get("unet_seconds", 0.0) / self.seconds

    def jobs_per_s(self, steps: int, interactive: tuple[Report, Mix] | None = None) -> float:
        """Bulk jobs per second: image-steps less those of the `interactive` run's requests
        (all finished inside the window), over the bulk request's `steps`."""
        image_steps = self.grew().get("image_steps", 0.0)
        if interactive is not None:
            report, mix = interactive
            image_steps -= sum(r.images * mix.request(r.index).steps for r in report.ok)
        return image_steps / self.seconds / steps


@contextlib.asynccontextmanager
async def window():
    w = Window(await counters())
    t = time.perf_counter()
    yield w
    w.seconds = time.perf_counter() - t
    w.after = await counters()


@dataclass(frozen=True)
class BacklogLoad:
    interactive: Mix
    rate: float
    requests: int
    bulk: diffusion_pb2.GenerateRequest
    ahead: int
    max_jobs: int
    unloaded_s: float


async def backlog(servers: Servers, load: BacklogLoad) -> dict:
    """Interactive requests at `rate` on an idle server, then the jobs' throughput alone, then
    the same interactive load over the backlog; p99s, throughputs and their ratios."""
    steps = load.bulk.steps
    async with (
        grpc.aio.insecure_channel(servers.target) as channel,
        sender(servers.target, servers.metadata()) as send,
    ):
        stub = diffusion_pb2_grpc.DiffusionServiceStub(channel)
        await drive(send, mix=load.interactive, concurrency=1, requests=2)  # warm-up
        poisson = dict(mix=load.interactive, rate=load.rate, requests=load.requests)
        async with window() as idle_window:
            idle = await drive(send, **poisson)
        async with Backlog(stub, servers.metadata(), load.bulk, load.ahead, load.max_jobs) as jobs:
            await wait_running()
            async with window() as alone:
                await asyncio.sleep(load.unloaded_s)
            jobs.watch()
            async with window() as shared:
                loaded = await drive(send, **poisson)
            low, submitted, succeeded = jobs.low, len(jobs.ids), await jobs.succeeded()
    unloaded = alone.jobs_per_s(steps)
    loaded_rate = shared.jobs_per_s(steps, (loaded, load.interactive))
    return {
        "idle": _brief(idle) | {"unet_busy": idle_window.busy},
        "loaded": _brief(loaded) | {"unet_busy": shared.busy},
        "p99_loaded_over_idle": loaded.summary()["p99_s"] / idle.summary()["p99_s"],
        "jobs_per_s_unloaded": unloaded,
        "jobs_per_s_loaded": loaded_rate,
        "jobs_kept": loaded_rate / unloaded if unloaded else None,
        "unet_busy_jobs_alone": alone.busy,
        "jobs_submitted": submitted,
        "jobs_succeeded": succeeded,
        "fewest_jobs_outstanding": low,
        "backlog_ran_dry": low < load.ahead / 2,
        "denoiser_during_loaded_run": shared.grew(),
    }


def _brief(report: Report) -> dict:
    s = report.summary()
    keep = ("requests", "ok", "errors", "p50_s", "p90_s", "p95_s", "p99_s", "slo_attainment",
            "goodput_rps", "wall_s")  # fmt: skip
    return {k: s[k] for k in keep if k in s}


async def tenants(servers: Servers, load: BacklogLoad, basis: dict, scale: float) -> dict:
    """Tenant B's interactive load (with SLOs) alone, then while tenant A floods bulk jobs;
    B's attainment both times and the drop in points."""
    async with (
        grpc.aio.insecure_channel(servers.target) as channel,
        sender(servers.target, servers.metadata("tenant-b")) as send,
    ):
        stub = diffusion_pb2_grpc.DiffusionServiceStub(channel)
        poisson = dict(mix=load.interactive, rate=load.rate, requests=load.requests)
        alone = await drive(send, **poisson)
        flood = Backlog(stub, servers.metadata("tenant-a"), load.bulk, load.ahead, load.max_jobs)
        async with flood:
            await wait_running()
            flood.watch()
            async with window() as shared:
                flooded = await drive(send, **poisson)
    for report in (alone, flooded):
        assign_slos(report, load.interactive, basis, scale)
    a, f = alone.summary()["slo_attainment"], flooded.summary()["slo_attainment"]
    return {
        "alone": _brief(alone),
        "flooded": _brief(flooded) | {"unet_busy": shared.busy},
        "attainment_drop_points": 100 * (a - f),
        "tenant_a_jobs_submitted": len(flood.ids),
        "tenant_a_jobs_per_s": shared.jobs_per_s(load.bulk.steps, (flooded, load.interactive)),
        "tenant_a_backlog_ran_dry": flood.low < load.ahead / 2,
        "denoiser_during_flood": shared.grew(),
    }
