"""`sdserve loadtest`: closed- or open-loop gRPC load against DiffusionService.Generate.

- Closed loop (`--concurrency C`): C clients, each sends its next request when the last one ends.
- Open loop (`--rate R`): requests arrive as a Poisson process of R per second, whatever the
  server does (at most `--max-in-flight` outstanding; arrivals past that count as errors).

Every run is bounded by `--requests N` and/or `--duration S`. Request options take
comma-separated lists, which make a mix: request i uses element i mod len of each list.
"""

from __future__ import annotations

import asyncio
import json
import math
import random
import sys
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field

import grpc

from sdserve.v1 import diffusion_pb2, diffusion_pb2_grpc


@dataclass(frozen=True)
class Mix:
    """The request options; each list cycles independently."""

    prompts: tuple[str, ...] = ("a red circle on a blue background",)
    steps: tuple[int | None, ...] = (None,)
    schedulers: tuple[str, ...] = ("",)
    widths: tuple[int | None, ...] = (None,)
    heights: tuple[int | None, ...] = (None,)
    guidances: tuple[float | None, ...] = (None,)
    init_image: bytes = field(default=b"", repr=False)
    """Image-to-image (inpainting with `mask_image`) for every `image_every`-th request."""
    mask_image: bytes = field(default=b"", repr=False)
    strengths: tuple[float | None, ...] = (None,)
    image_every: int = 1
    guidance_stops: tuple[float | None, ...] = (None,)
    cache_intervals: tuple[int | None, ...] = (None,)
    models: tuple[str, ...] = ("",)
    """Served model names ("": the server's default)."""
    loras: tuple[tuple[tuple[str, float], ...], ...] = ((),)
    """LoRA adapter sets, one per request in turn: ((name, scale), ...) each; () for none."""

    def request(self, i: int) -> diffusion_pb2.GenerateRequest:
        def pick(options):
            return options[i % len(options)]

        request = self._text_request(i, pick)
        if self.init_image and i % self.image_every == 0:
            request.init_image, request.mask_image = self.init_image, self.mask_image
            request.ClearField("width")  # the image's size
            request.ClearField("height")
            strength = self.strengths[(i // self.image_every) % len(self.strengths)]
            if strength is not None:
                request.strength = strength
        return request

    def _text_request(self, i: int, pick) -> diffusion_pb2.GenerateRequest:
        request = diffusion_pb2.GenerateRequest(
            prompt=pick(self.prompts), scheduler=pick(self.schedulers), seed=i,
            model=pick(self.models),
        )  # fmt: skip
        for name, scale in pick(self.loras):
            request.loras.add(name=name, scale=scale)
        optional = {
            "steps": self.steps,
            "width": self.widths,
            "height": self.heights,
            "guidance_scale": self.guidances,
            "guidance_stop": self.guidance_stops,
            "cache_interval": self.cache_intervals,
        }
        for name, options in optional.items():
            value = pick(options)
            if value is not None:
                setattr(request, name, value)
        return request


@dataclass
class Record:
    index: int
    start_s: float
    """Seconds after the run started."""
    latency_s: float
    code: str
    images: int
    kind: str = "text"
    """text (text-to-image), image (image-to-image) or inpaint."""


@dataclass
class Report:
    mode: str
    concurrency: int | None
    rate: float | None
    wall_s: float = 0.0
    records: list[Record] = field(default_factory=list)

    @property
    def ok(self) -> list[Record]:
        return [r for r in self.records if r.code == "OK"]

    def percentile(self, q: float) -> float:
        """Latency percentile (0..100) of successful requests, nearest-rank."""
        latencies = sorted(r.latency_s for r in self.ok)
        if not latencies:
            return float("nan")
        rank = max(1, min(len(latencies), math.ceil(q / 100 * len(latencies))))
        return latencies[rank - 1]

    def summary(self) -> dict:
        images = sum(r.images for r in self.ok)
        errors = Counter(r.code for r in self.records if r.code != "OK")
        return {
            "mode": self.mode,
            "concurrency": self.concurrency,
            "rate": self.rate,
            "requests": len(self.records),
            "ok": len(self.ok),
            "images": images,
            "wall_s": self.wall_s,
            "images_per_s": images / self.wall_s if self.wall_s else 0.0,
            "p50_s": self.percentile(50),
            "p90_s": self.percentile(90),
            "p99_s": self.percentile(99),
            "mean_s": (sum(r.latency_s for r in self.ok) / len(self.ok)) if self.ok else None,
            "errors": dict(errors),
            "by_kind": self._by_kind(),
        }

    def _by_kind(self) -> dict:
        """Per request kind (text, image, inpaint; MODEL:kind for a named model): OK requests,
        images/s and median latency."""
        out = {}
        for kind in sorted({r.kind for r in self.records}):
            ok = sorted(r.latency_s for r in self.ok if r.kind == kind)
            images = sum(r.images for r in self.ok if r.kind == kind)
            out[kind] = {
                "ok": len(ok),
                "images_per_s": images / self.wall_s if self.wall_s else 0.0,
                "p50_s": ok[(len(ok) - 1) // 2] if ok else None,
            }
        return out

    def to_json(self) -> dict:
        return {"summary": self.summary(), "records": [asdict(r) for r in self.records]}


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
    mix: Mix = Mix(),
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


async def run_loadtest(
    target: str,
    *,
    timeout_s: float = 600.0,
    application: str = "",
    metadata: tuple[tuple[str, str], ...] = (),
    **kwargs,
) -> Report:
    """`drive` against DiffusionService.Generate at `target` (keyword arguments as `drive`).
    `application` names the Serve application when the proxy serves several; `metadata` goes
    with every call (an API key)."""
    metadata = (*metadata, *((("application", application),) if application else ())) or None
    # A channel per 50 clients, as separate clients would have: one HTTP/2 connection for
    # hundreds of calls throttled them in the client (measured: the server then idled).
    clients = kwargs.get("concurrency") or 50
    channels = [grpc.aio.insecure_channel(target) for _ in range(max(1, (clients + 49) // 50))]
    stubs = [diffusion_pb2_grpc.DiffusionServiceStub(c) for c in channels]
    try:

        async def send(request: diffusion_pb2.GenerateRequest) -> int:
            stub = stubs[request.seed % len(stubs)]
            reply = await stub.Generate(request, timeout=timeout_s, metadata=metadata)
            return len(reply.images)

        return await drive(send, **kwargs)
    finally:
        for channel in channels:
            await channel.close()


def format_summary(summary: dict) -> str:
    lines = [
        f"requests   {summary['requests']} ({summary['ok']} ok) in {summary['wall_s']:.1f}s",
        f"images/s   {summary['images_per_s']:.2f}",
        f"latency    p50 {summary['p50_s']:.3f}s   p90 {summary['p90_s']:.3f}s   "
        f"p99 {summary['p99_s']:.3f}s",
    ]
    if len(summary.get("by_kind", {})) > 1:
        lines.append("by kind    " + "   ".join(
            f"{kind} {k['ok']} ok, {k['images_per_s']:.2f} img/s"
            for kind, k in summary["by_kind"].items()))  # fmt: skip
    errors = summary["errors"]
    lines.append(
        "errors     " + (", ".join(f"{k} {v}" for k, v in sorted(errors.items())) or "none")
    )
    return "\n".join(lines)


def progress_line(report: Report, in_flight: int) -> None:
    """The live line on stderr."""
    done = len(report.records)
    errors = sum(r.code != "OK" for r in report.records)
    images = sum(r.images for r in report.records)
    rate = images / report.wall_s if report.wall_s else 0.0
    sys.stderr.write(
        f"\r{report.wall_s:6.1f}s  done {done}  errors {errors}  in flight {in_flight}  "
        f"{rate:.2f} img/s   "
    )
    sys.stderr.flush()


def lora_set(spec: str) -> tuple[tuple[str, float], ...]:
    """ "none", or NAME[:SCALE] joined by "+": "cyan:0.8+pixel" -> (("cyan", 0.8), ("pixel", 1))."""
    if spec in ("", "none"):
        return ()
    out = []
    for part in spec.split("+"):
        name, _, scale = part.partition(":")
        out.append((name, float(scale) if scale else 1.0))
    return tuple(out)


def _split(text: str | None, cast) -> tuple:
    if text is None:
        return (None,)
    return tuple(cast(x.strip()) for x in text.split(",") if x.strip())


def main(args) -> int:
    """`sdserve loadtest` (argparse Namespace from sdserve.cli)."""
    mix = Mix(
        prompts=tuple(args.prompt) if args.prompt else Mix().prompts,
        steps=_split(args.steps, int),
        schedulers=_split(args.scheduler, str) if args.scheduler else ("",),
        widths=_split(args.width, int),
        heights=_split(args.height, int),
        guidances=_split(args.guidance, float),
        init_image=args.init_image or b"",
        mask_image=args.mask or b"",
        strengths=_split(args.strength, float),
        image_every=max(1, args.image_every),
        guidance_stops=_split(args.guidance_stop, float),
        cache_intervals=_split(args.cache_interval, int),
        models=_split(args.model, str) if args.model else ("",),
        loras=tuple(lora_set(spec) for spec in args.lora) if args.lora else ((),),
    )
    requests, duration = args.requests, args.duration
    if requests is None and duration is None:
        requests = 50
    common = dict(
        mix=mix,
        concurrency=None if args.rate else args.concurrency,
        rate=args.rate,
        requests=requests,
        duration_s=duration,
        timeout_s=args.timeout,
        metadata=args.metadata or (),
        on_progress=None if args.quiet else progress_line,
    )
    if args.http:
        from sdserve.loadtest_http import run_http_loadtest

        report = asyncio.run(run_http_loadtest(args.http, **common))
    else:
        report = asyncio.run(
            run_loadtest(args.server, application=args.application or "", **common)
        )
    if not args.quiet:
        sys.stderr.write("\n")
    summary = report.summary()
    print(format_summary(summary))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report.to_json(), f, indent=2)
        print(f"full report: {args.out}")
    if args.plot:
        from sdserve.plot import plot_report

        print(f"plot: {plot_report(report, args.plot)}")
    return 0 if summary["ok"] else 1
