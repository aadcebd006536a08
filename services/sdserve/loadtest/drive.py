"""`drive`: one bounded closed- or open-loop load against any `Sender`.

- Closed loop (`concurrency=C`): C clients, each sends its next request when the last one ends.
- Open loop (`rate=R`): requests arrive as a Poisson process of R per second, whatever the
  server does (at most `max_in_flight` outstanding; arrivals past that count as errors).

Every run is bounded by `requests` and/or `duration_s`.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Awaitable, Callable

import grpc

from sdserve.loadtest.mix import Mix
from sdserve.loadtest.report import Record, Report
from sdserve.v1 import diffusion_pb2

Sender = Callable[[diffusion_pb2.GenerateRequest], Awaitable[int]]
"""Sends one request and returns the number of images; raises grpc.aio.AioRpcError or
`SendError` on errors."""


class SendError(Exception):
    """A request failed with `code` (a gRPC code name, or HTTP_<status>)."""

    def __init__(self, code: str):
        super().__init__(code)
        self.code = code

    @staticmethod
    def code_of(exc: Exception) -> str:
        """The code name of a failed send: a SendError's, or a gRPC error's."""
        return exc.code if isinstance(exc, SendError) else exc.code().name


async def drive(
    send: Sender,
    *,
    mix: Mix | None = None,
    concurrency: int | None = None,
    rate: float | None = None,
    requests: int | None = None,
    duration_s: float | None = None,
    max_in_flight: int = 1000,
    seed: int = 0,
    on_progress: Callable[[Report, int], None] | None = None,
) -> Report:
    """Runs one bounded load against `send` and returns every request's record. bench/ drives
    an in-process diffusers pipeline with it, so both sides are measured the same way."""
    if (concurrency is None) == (rate is None):
        raise ValueError("give exactly one of concurrency (closed loop) or rate (open loop)")
    if requests is None and duration_s is None:
        raise ValueError("give requests and/or duration_s: every run is bounded")
    mix = mix or Mix()
    report = Report(mode="closed" if concurrency else "open", concurrency=concurrency, rate=rate)
    started = time.perf_counter()
    stop_at = started + duration_s if duration_s is not None else float("inf")
    issued = 0
    in_flight = 0

    async def one(i: int) -> None:
        nonlocal in_flight
        in_flight += 1
        t0 = time.perf_counter()
        request = mix.request(i)
        kind = "inpaint" if request.mask_image else "image" if request.init_image else "text"
        kind = f"{request.model}:{kind}" if request.model else kind
        try:
            code, images = "OK", await send(request)
        except (grpc.aio.AioRpcError, SendError) as exc:
            code, images = SendError.code_of(exc), 0
        finally:
            in_flight -= 1
        latency = time.perf_counter() - t0
        report.records.append(Record(i, t0 - started, latency, code, images, kind))

    def take() -> int | None:
        nonlocal issued
        if time.perf_counter() >= stop_at or (requests is not None and issued >= requests):
            return None
        issued += 1
        return issued - 1

    async def progress() -> None:
        while True:
            await asyncio.sleep(0.5)
            if on_progress is not None:
                report.wall_s = time.perf_counter() - started
                on_progress(report, in_flight)

    ticker = asyncio.create_task(progress())
    try:
        if concurrency:

            async def client() -> None:
                while (i := take()) is not None:
                    await one(i)

            await asyncio.gather(*(client() for _ in range(concurrency)))
        else:
            rng = random.Random(seed)
            tasks = []
            next_at = time.perf_counter()
            while (i := take()) is not None:
                next_at += rng.expovariate(rate)
                await asyncio.sleep(max(0.0, next_at - time.perf_counter()))
                if in_flight >= max_in_flight:
                    report.records.append(Record(i, next_at - started, 0.0, "CLIENT_OVERLOAD", 0))
                    continue
                tasks.append(asyncio.create_task(one(i)))
            await asyncio.gather(*tasks)
    finally:
        ticker.cancel()
    report.wall_s = time.perf_counter() - started
    report.records.sort(key=lambda r: r.index)
    return report
