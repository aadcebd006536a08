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
    load = _Load(send, mix or Mix(), requests, duration_s)
    load.report = Report(mode="closed" if concurrency else "open", concurrency=concurrency,
                         rate=rate)  # fmt: skip
    ticker = asyncio.create_task(load.tick(on_progress))
    try:
        if concurrency:
            await load.closed_loop(concurrency)
        else:
            await load.open_loop(rate, max_in_flight, seed)
    finally:
        ticker.cancel()
    load.report.wall_s = time.perf_counter() - load.started
    load.report.records.sort(key=lambda r: r.index)
    return load.report


class _Load:
    """One run of `drive`: the requests it has issued, those in flight, their records."""

    def __init__(self, send: Sender, mix: Mix, requests: int | None, duration_s: float | None):
        self.send, self.mix, self.requests = send, mix, requests
        self.started = time.perf_counter()
        self.stop_at = self.started + duration_s if duration_s is not None else float("inf")
        self.issued = 0
        self.in_flight = 0
        self.report: Report

    def take(self) -> int | None:
        """The next request's index, or None once the run's bound is reached."""
        if time.perf_counter() >= self.stop_at or (
            self.requests is not None and self.issued >= self.requests
        ):
            return None
        self.issued += 1
        return self.issued - 1

    async def one(self, i: int) -> None:
        """Sends request i and records how it ended."""
        self.in_flight += 1
        t0 = time.perf_counter()
        request = self.mix.request(i)
        kind = "inpaint" if request.mask_image else "image" if request.init_image else "text"
        kind = f"{request.model}:{kind}" if request.model else kind
        try:
            code, images = "OK", await self.send(request)
        except (grpc.aio.AioRpcError, SendError) as exc:
            code, images = SendError.code_of(exc), 0
        finally:
            self.in_flight -= 1
        latency = time.perf_counter() - t0
        self.report.records.append(Record(i, t0 - self.started, latency, code, images, kind))

    async def closed_loop(self, concurrency: int) -> None:
        """`concurrency` clients, each sending its next request when its last one ends."""

        async def client() -> None:
            while (i := self.take()) is not None:
                await self.one(i)

        await asyncio.gather(*(client() for _ in range(concurrency)))

    async def open_loop(self, rate: float, max_in_flight: int, seed: int) -> None:
        """Poisson arrivals of `rate` per second; an arrival past `max_in_flight` outstanding
        requests is recorded as CLIENT_OVERLOAD and not sent."""
        rng = random.Random(seed)
        tasks = []
        next_at = time.perf_counter()
        while (i := self.take()) is not None:
            next_at += rng.expovariate(rate)
            await asyncio.sleep(max(0.0, next_at - time.perf_counter()))
            if self.in_flight >= max_in_flight:
                self.report.records.append(
                    Record(i, next_at - self.started, 0.0, "CLIENT_OVERLOAD", 0)
                )
                continue
            tasks.append(asyncio.create_task(self.one(i)))
        await asyncio.gather(*tasks)

    async def tick(self, on_progress: Callable[[Report, int], None] | None) -> None:
        """Calls `on_progress` every half second with the report so far."""
        while True:
            await asyncio.sleep(0.5)
            if on_progress is not None:
                self.report.wall_s = time.perf_counter() - self.started
                on_progress(self.report, self.in_flight)
