"""SLO attainment and goodput, measured the way the field measures diffusion serving (vLLM-Omni's
`diffusion_benchmark_serving.py`, copied by SGLang):

1. `expected_times`: each distinct request shape (`slo_key`: model, size, steps, scheduler) is
   sent alone (concurrency 1) to learn its solo latency;
2. `assign_slos`: each request of a load gets an SLO of its shape's solo latency × `scale`
   (3 by default);
3. `rate_sweep`: one open-loop (Poisson) load per offered rate, each with its SLOs assigned; the
   `Report`'s summary then has `slo_attainment` (the share of requests that ended OK within their
   SLO: errors and refusals are misses) and `goodput_rps` (requests per second that met it).

Everything takes either a `Sender` (driven with `drive` here) or a `Target` (something that
makes its own sender for each load: the gRPC and HTTP load testers).
"""

from __future__ import annotations

import asyncio
import math
import statistics
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from functools import partial

from sdserve.loadtest.drive import Sender, drive
from sdserve.loadtest.mix import Mix
from sdserve.loadtest.report import Report
from sdserve.v1 import diffusion_pb2

DEFAULT_SCALE = 3.0
"""The field's default: an SLO of three times the request's solo latency."""

SCANNED = 512
"""How many of a mix's first requests `expected_times` looks at for distinct shapes (the mix
cycles; its period is the lcm of its lists' lengths, past this only for unusual mixes)."""


@dataclass(frozen=True)
class Target:
    """A load target that makes its own sender for each load: `run` takes `drive`'s keyword
    arguments (mix, concurrency or rate, requests, ...) and returns the load's `Report`. The
    gRPC and HTTP load testers are targets: `Target(partial(run_loadtest, "127.0.0.1:50051"))`."""

    run: Callable[..., Awaitable[Report]]


def slo_key(request: diffusion_pb2.GenerateRequest) -> tuple[str, int, int, int, str]:
    """(model, width, height, steps, scheduler): the shape whose solo latency sets a request's
    SLO. A field left unset is its unset value ("" or 0: the server's default). Other options
    (image inputs, LoRAs, guidance stop) are not part of it, as in the field's benchmark."""
    return (request.model, request.width, request.height, request.steps, request.scheduler)


def describe_key(key: tuple) -> str:
    """`slo_key` for people: "default model, 64x64, 4 steps, ddim"."""
    model, width, height, steps, scheduler = key
    size = (f"{width}x{height}" if width and height else f"width {width}" if width
            else f"height {height}" if height else "default size")  # fmt: skip
    steps = f"{steps} steps" if steps else "default steps"
    return f"{model or 'default model'}, {size}, {steps}, {scheduler or 'default scheduler'}"


def request_shapes(mix: Mix, scanned: int = SCANNED) -> dict[tuple, diffusion_pb2.GenerateRequest]:
    """Each distinct `slo_key` among the mix's first `scanned` requests → its first request, in
    the order they come."""
    shapes: dict[tuple, diffusion_pb2.GenerateRequest] = {}
    for i in range(scanned):
        request = mix.request(i)
        shapes.setdefault(slo_key(request), request)
    return shapes


class _Listed:
    """A list of requests in the shape of a `Mix` (`request(i)`), for `drive`."""

    def __init__(self, requests: list[diffusion_pb2.GenerateRequest]):
        self.requests = requests

    def request(self, i: int) -> diffusion_pb2.GenerateRequest:
        return self.requests[i]


def _runner(send: Sender | Target) -> Callable[..., Awaitable[Report]]:
    return send.run if isinstance(send, Target) else partial(drive, send)


async def expected_times(
    send: Sender | Target,
    mix: Mix,
    *,
    repeats: int = 2,
    warmups: int = 1,
    scanned: int = SCANNED,
    timeout_s: float | None = None,
) -> dict[tuple, float]:
    """Each distinct `slo_key` among the mix's first `scanned` requests → its solo latency (s).

    Per shape, the first request of the mix with that shape is sent `warmups` times and then
    `repeats` times, one at a time (concurrency 1, shape after shape); the warm-ups are dropped
    (a shape's first request may pay one-time costs: compiling, loading a LoRA) and the expected
    time is the median of the OK repeats. A shape none of whose repeats ended OK is left out (its
    requests get no SLO and count as misses). Bounded: at most (warmups + repeats) requests a
    shape, and `timeout_s` for all of it (asyncio.TimeoutError past that).

    Raises ValueError when no shape could be measured.
    """
    if repeats < 1 or warmups < 0:
        raise ValueError("repeats must be >= 1 and warmups >= 0")
    shapes = request_shapes(mix, scanned)
    per_shape = warmups + repeats
    listed = [request for request in shapes.values() for _ in range(per_shape)]
    load = _runner(send)(mix=_Listed(listed), concurrency=1, requests=len(listed))
    report = await asyncio.wait_for(load, timeout_s)
    expected = {}
    for n, key in enumerate(shapes):
        measured = report.records[n * per_shape + warmups : (n + 1) * per_shape]
        ok = [r.latency_s for r in measured if r.code == "OK"]
        if ok:
            expected[key] = statistics.median(ok)
    if not expected:
        codes = sorted({r.code for r in report.records})
        raise ValueError(f"no request shape could be measured alone (outcomes: {codes})")
    return expected


def assign_slos(report: Report, mix: Mix, expected: dict[tuple, float], scale: float) -> None:
    """Sets each record's `slo_s` to the expected time of its request's shape × `scale` (None
    where the shape has no expected time: the request then counts as a miss)."""
    if scale <= 0:
        raise ValueError(f"the SLO scale must be positive, not {scale}")
    for record in report.records:
        solo = expected.get(slo_key(mix.request(record.index)))
        record.slo_s = solo * scale if solo is not None else None


async def rate_sweep(
    send: Sender | Target,
    mix: Mix,
    rates: list[float],
    *,
    requests: int | None = None,
    duration_s: float | None = None,
    expected: dict[tuple, float] | None = None,
    scale: float = DEFAULT_SCALE,
    max_in_flight: int = 1000,
    seed: int = 0,
    on_progress: Callable[[Report, int], None] | None = None,
    on_report: Callable[[Report], None] | None = None,
) -> list[Report]:
    """One bounded open-loop load per rate (requests/s, Poisson arrivals, `drive`'s bounds and
    seed), one after the other, each ending when its last request has; SLOs assigned to every
    report. `expected` None: measured first with `expected_times` (its defaults).
    `on_report` is called with each rate's report as it ends."""
    if not rates or any(rate <= 0 for rate in rates):
        raise ValueError(f"give one or more positive rates, not {rates}")
    if expected is None:
        expected = await expected_times(send, mix)
    run = _runner(send)
    reports = []
    for rate in rates:
        report = await run(mix=mix, rate=rate, requests=requests, duration_s=duration_s,
                           max_in_flight=max_in_flight, seed=seed,
                           on_progress=on_progress)  # fmt: skip
        assign_slos(report, mix, expected, scale)
        reports.append(report)
        if on_report is not None:
            on_report(report)
    return reports


def parse_sweep(text: str) -> list[float]:
    """ "A:B:N" → N offered rates evenly spaced from A to B inclusive ("1:4:4" → [1, 2, 3, 4]).
    Raises ValueError on anything else (0 < A <= B; N >= 1, and N = 1 only when A = B)."""
    try:
        low_text, high_text, count_text = text.split(":")
        low, high, count = float(low_text), float(high_text), int(count_text)
    except ValueError:
        raise ValueError(f"a rate sweep is A:B:N (from A to B requests/s in N rates, e.g. "
                         f"0.5:4:8), not {text!r}") from None  # fmt: skip
    if not (0 < low <= high and math.isfinite(high)):
        raise ValueError(f"a rate sweep needs 0 < A <= B, not {text!r}")
    if count < 1 or (count == 1 and low != high):
        raise ValueError(f"a rate sweep from {low:g} to {high:g} needs N >= 2 rates, not {count}")
    if count == 1:
        return [low]
    return [round(low + (high - low) * i / (count - 1), 9) for i in range(count)]


def format_sweep(reports: list[Report]) -> str:
    """A table of a sweep: one row per offered rate."""
    lines = [f"{'rate/s':>8} {'requests':>8} {'ok':>5} {'img/s':>7} {'p50 s':>7} {'p95 s':>7} "
             f"{'p99 s':>7} {'SLO met':>8} {'goodput/s':>10}"]  # fmt: skip
    for report in reports:
        s = report.summary()
        attained = f"{s['slo_attainment']:.1%}" if "slo_attainment" in s else "-"
        goodput = f"{s['goodput_rps']:.2f}" if "goodput_rps" in s else "-"
        lines.append(
            f"{s['rate']:>8.2f} {s['requests']:>8} {s['ok']:>5} {s['images_per_s']:>7.2f} "
            f"{s['p50_s']:>7.3f} {report.percentile(95):>7.3f} {s['p99_s']:>7.3f} "
            f"{attained:>8} {goodput:>10}"
        )
    return "\n".join(lines)
