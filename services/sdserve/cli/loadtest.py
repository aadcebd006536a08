"""`sdserve loadtest`: bounded closed- or open-loop gRPC (or HTTP) load, with SLO attainment and
goodput (`--slo-scale`) and open-loop rate sweeps (`--rate-sweep`); the load generator is the
library sdserve.loadtest."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from typing import TYPE_CHECKING

from sdserve.cli.options import (
    Parents,
    add_cheaper_step_options,
    add_control_options,
    add_image_options,
    add_transformer_options,
    channel_credentials,
    require_extra,
)

if TYPE_CHECKING:
    from sdserve.loadtest import Mix, Report, Target


def register(sub, parents: Parents) -> None:
    load = sub.add_parser(
        "loadtest",
        help="send bounded gRPC load to a server and report images/s and latency",
        description="Closed loop (--concurrency C), open loop (--rate R, Poisson arrivals) or "
        "an open-loop sweep of rates (--rate-sweep A:B:N) against DiffusionService.Generate (or "
        "the HTTP API: --http), each load bounded by --requests and/or --duration (default: 50 "
        "requests). Request options take comma-separated lists, which make a mix. With "
        "--slo-scale S (the default with --rate-sweep: 3), each request shape (model, size, "
        "steps, scheduler) is first sent alone to learn its solo latency; each request's SLO is "
        "that × S, and the report adds the share of requests that ended OK within their SLO "
        "(errors are misses) and the goodput (requests/s within SLO).",
        parents=[parents.server, parents.timeout(600.0, "per-request deadline"), parents.quiet],
    )
    _add_load_shape(load)
    _add_bounds(load)
    load.add_argument(
        "--prompt", action="append", metavar="TEXT", help="a prompt (repeat for a mix)"
    )
    load.add_argument("--steps", metavar="N[,N...]", help="denoising steps")
    load.add_argument("--scheduler", metavar="NAME[,NAME...]", help="sampler(s)")
    load.add_argument("--width", metavar="W[,W...]", help="width(s) in pixels")
    load.add_argument("--height", metavar="H[,H...]", help="height(s) in pixels")
    load.add_argument("--guidance", metavar="G[,G...]", help="guidance scale(s)")
    load.add_argument(
        "--model", metavar="NAME[,NAME...]", help="served model(s) (default: the server's default)"
    )
    load.add_argument(
        "--lora",
        action="append",
        metavar="NAME[:SCALE][+NAME[:SCALE]...]|none",
        help="a LoRA adapter set for a share of the requests; repeat for a mix: requests take "
        "the sets in turn (none: no adapter)",
    )
    add_image_options(load, strengths=True)
    add_control_options(load)
    load.add_argument(
        "--control-every",
        type=int,
        default=1,
        metavar="K",
        help="with --control: every K-th request is conditioned, the others not (default "
        "%(default)s: all)",
    )
    add_cheaper_step_options(load, lists=True)
    add_transformer_options(load, lists=True)
    load.add_argument(
        "--image-every",
        type=int,
        default=1,
        metavar="K",
        help="with --init-image: every K-th request is image-to-image (or inpainting), the "
        "others text-to-image (default %(default)s: all)",
    )
    load.add_argument(
        "--out",
        metavar="FILE.json",
        help="write the full report (every request; with a sweep, one report per rate; with "
        "SLOs, the solo latencies too)",
    )
    load.add_argument(
        "--plot",
        metavar="FILE.png",
        help="draw latency over time, throughput per second and the latency distribution (with "
        "--rate-sweep: SLO attainment, goodput and p99 latency against the offered rate)",
    )
    load.add_argument(
        "--application", metavar="NAME", help="the Serve application, when the proxy serves several"
    )
    load.add_argument(
        "--http",
        metavar="URL",
        help="load the OpenAI-compatible HTTP API at URL (http://127.0.0.1:8000: POST "
        "/v1/images/generations, b64_json) instead of gRPC at --server",
    )
    load.set_defaults(func=run)


def _add_load_shape(load) -> None:
    """The load's loop (closed, open or a sweep of rates) and its SLOs."""
    loop = load.add_mutually_exclusive_group()
    loop.add_argument(
        "--concurrency",
        type=int,
        default=1,
        metavar="C",
        help="closed loop with C clients (default %(default)s)",
    )
    loop.add_argument("--rate", type=float, metavar="R", help="open loop, R requests/s on average")
    loop.add_argument(
        "--rate-sweep",
        type=_sweep_rates,
        metavar="A:B:N",
        help="open loop at N rates evenly from A to B requests/s (1:4:4 is 1, 2, 3 and 4), one "
        "load each (bounded by --requests/--duration), with SLOs (--slo-scale, default 3): a "
        "line per rate and a table at the end; --out writes every rate's report, --plot draws "
        "attainment, goodput and p99 latency against the rate",
    )
    load.add_argument(
        "--slo-scale",
        type=_positive,
        metavar="S",
        help="first send each request shape alone (concurrency 1: one warm-up, then the median "
        "of two) and print its latency; each request's SLO is that × S; report the SLO "
        "attainment and goodput (3 is the field's usual choice)",
    )


def _add_bounds(load) -> None:
    load.add_argument(
        "--requests", type=int, metavar="N", help="stop after N requests (per rate with a sweep)"
    )
    load.add_argument(
        "--duration", type=float, metavar="S", help="stop issuing after S seconds (per rate)"
    )


def run(args: argparse.Namespace) -> int:
    """`sdserve loadtest`: builds the mix from the options, measures the solo latencies when
    SLOs are asked for, drives the load (or a sweep of loads), prints the summary (and writes
    the report and picture when asked)."""
    from sdserve.loadtest.slo import DEFAULT_SCALE

    require_extras(args)
    requests, duration = args.requests, args.duration
    if requests is None and duration is None:
        requests = 50
    mix = mix_of(args)
    scale = args.slo_scale or (DEFAULT_SCALE if args.rate_sweep else None)
    load = dict(mix=mix, requests=requests, duration_s=duration,
                on_progress=None if args.quiet else progress_line)  # fmt: skip
    if args.rate_sweep:
        return _sweep(args, target_of(args), load, scale)
    return _one(args, target_of(args), load, scale)


def target_of(args: argparse.Namespace) -> Target:
    """The load's target: gRPC at --server, or the HTTP API at --http."""
    from functools import partial

    from sdserve.cli.options import call_metadata
    from sdserve.loadtest import Target, run_loadtest

    common = dict(timeout_s=args.timeout, metadata=call_metadata() or ())
    if args.http:
        from sdserve.loadtest.http_target import run_http_loadtest

        return Target(partial(run_http_loadtest, args.http, **common))
    return Target(partial(run_loadtest, args.server, application=args.application or "",
                          credentials=channel_credentials(args), **common))  # fmt: skip


def _one(args: argparse.Namespace, target: Target, load: dict, scale: float | None) -> int:
    """One closed- or open-loop load (SLOs assigned when `scale` is given)."""
    from sdserve.loadtest import assign_slos, format_summary

    async def measured():
        expected = await _expected(target, load["mix"], scale, args.quiet) if scale else {}
        loop = dict(rate=args.rate) if args.rate else dict(concurrency=args.concurrency)
        report = await target.run(**load, **loop)
        if scale:
            assign_slos(report, load["mix"], expected, scale)
        return report, expected

    report, expected = asyncio.run(measured())
    if not args.quiet:
        sys.stderr.write("\n")
    summary = report.summary()
    print(format_summary(summary))
    if args.out:
        _write(args.out, report.to_json() | _slo_json(expected, scale))
    if args.plot:
        from sdserve.loadtest.plot import plot_report

        print(f"plot: {plot_report(report, args.plot)}")
    return 0 if summary["ok"] else 1


def _sweep(args: argparse.Namespace, target: Target, load: dict, scale: float) -> int:
    """One open-loop load per rate of --rate-sweep, with SLOs: a line per rate, then a table."""
    from sdserve.loadtest import format_sweep, rate_sweep

    def each(report: Report) -> None:
        if not args.quiet:
            sys.stderr.write("\n")
        print(sweep_line(report.summary()), flush=True)

    async def swept():
        expected = await _expected(target, load["mix"], scale, args.quiet)
        reports = await rate_sweep(target, rates=args.rate_sweep, expected=expected,
                                   scale=scale, on_report=each, **load)  # fmt: skip
        return reports, expected

    reports, expected = asyncio.run(swept())
    print(format_sweep(reports))
    if args.out:
        _write(args.out, {"reports": [r.to_json() for r in reports]} | _slo_json(expected, scale))
    if args.plot:
        from sdserve.loadtest.plot import plot_sweep

        print(f"plot: {plot_sweep(reports, args.plot)}")
    return 0 if any(r.ok for r in reports) else 1


async def _expected(target: Target, mix: Mix, scale: float, quiet: bool) -> dict[tuple, float]:
    """The solo latency of each request shape of the mix, printed with its SLO."""
    from sdserve.loadtest import expected_times
    from sdserve.loadtest.slo import describe_key, request_shapes

    shapes = request_shapes(mix)
    if not quiet:
        sys.stderr.write(f"measuring {len(shapes)} request shape(s) alone...\n")
    try:
        expected = await expected_times(target, mix)
    except ValueError as exc:  # no shape could be measured
        raise SystemExit(f"sdserve loadtest: {exc}") from None
    print(f"solo latency (concurrency 1) and SLO (x{scale:g}) per request shape:")
    width = max(len(describe_key(key)) for key in shapes)
    for key in shapes:
        solo = expected.get(key)
        print(f"  {describe_key(key):{width}}  " + (f"{solo:.3f}s -> SLO {solo * scale:.3f}s"
              if solo is not None else "failed alone: its requests count as misses"))  # fmt: skip
    return expected


def _slo_json(expected: dict[tuple, float], scale: float | None) -> dict:
    if not scale:
        return {}
    names = ("model", "width", "height", "steps", "scheduler")
    return {"slo_scale": scale,
            "expected_s": [dict(zip(names, key, strict=True), solo_s=solo)
                           for key, solo in expected.items()]}  # fmt: skip


def _write(path: str, document: dict) -> None:
    with open(path, "w") as f:
        json.dump(document, f, indent=2)
    print(f"full report: {path}")


def sweep_line(summary: dict) -> str:
    """One rate's result, as it ends."""
    s = summary
    return (
        f"rate {s['rate']:.2f}/s: {s['requests']} requests ({s['ok']} ok), "
        f"{s['images_per_s']:.2f} img/s, p50 {s['p50_s']:.3f}s p95 {s['p95_s']:.3f}s "
        f"p99 {s['p99_s']:.3f}s, SLO {s['slo_attainment']:.1%} met, "
        f"goodput {s['goodput_rps']:.2f}/s"
    )


def mix_of(args: argparse.Namespace):
    """The `sdserve.loadtest.Mix` of the request options (each a comma-separated list)."""
    from sdserve.cli.options import controls
    from sdserve.client._calls import control_pb
    from sdserve.loadtest import Mix

    return Mix(
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
        max_sequence_lengths=_split(args.max_sequence_length, int),
        true_cfg_scales=_split(args.true_cfg_scale, float),
        shifts=_split(args.shift, float),
        models=_split(args.model, str) if args.model else ("",),
        loras=tuple(lora_set(spec) for spec in args.lora) if args.lora else ((),),
        controls=tuple(control_pb(c) for c in controls(args) or ()),
        control_every=max(1, args.control_every),
    )


EXTRA_MODULES = {"plot": "matplotlib", "http": "httpx"}
"""The option that needs each of the `loadtest` extra's packages (pyproject.toml)."""


def require_extras(args: argparse.Namespace) -> None:
    """Before any load: exits with the command that installs what `--plot` or `--http` needs,
    when that is missing (a server installed without the `loadtest` extra)."""
    for option, module in EXTRA_MODULES.items():
        if getattr(args, option):
            require_extra(module, "loadtest", f"sdserve loadtest --{option}")


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


def _sweep_rates(text: str) -> list[float]:
    from sdserve.loadtest import parse_sweep

    try:
        return parse_sweep(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _positive(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"a positive number, not {text!r}")
    return value


def _split(text: str | None, cast) -> tuple:
    if text is None:
        return (None,)
    return tuple(cast(x.strip()) for x in text.split(",") if x.strip())
