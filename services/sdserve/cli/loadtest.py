"""`sdserve loadtest`: bounded closed- or open-loop gRPC load (the load generator is the
library sdserve.loadtest)."""

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
    from sdserve.loadtest import Report


def register(sub, parents: Parents) -> None:
    load = sub.add_parser(
        "loadtest",
        help="send bounded gRPC load to a server and report images/s and latency",
        description="Closed loop (--concurrency C) or open loop (--rate R, Poisson arrivals) "
        "against DiffusionService.Generate, bounded by --requests and/or --duration (default: "
        "50 requests). Request options take comma-separated lists, which make a mix.",
        parents=[parents.server, parents.timeout(600.0, "per-request deadline"), parents.quiet],
    )
    loop = load.add_mutually_exclusive_group()
    loop.add_argument(
        "--concurrency",
        type=int,
        default=1,
        metavar="C",
        help="closed loop with C clients (default %(default)s)",
    )
    loop.add_argument("--rate", type=float, metavar="R", help="open loop, R requests/s on average")
    load.add_argument("--requests", type=int, metavar="N", help="stop after N requests")
    load.add_argument("--duration", type=float, metavar="S", help="stop issuing after S seconds")
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
    load.add_argument("--out", metavar="FILE.json", help="write the full report (every request)")
    load.add_argument(
        "--plot",
        metavar="FILE.png",
        help="draw latency over time, throughput per second and the latency distribution",
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


def run(args: argparse.Namespace) -> int:
    """`sdserve loadtest`: builds the mix from the options, drives the load, prints the summary
    (and writes the report and picture when asked)."""
    from sdserve.cli.options import call_metadata
    from sdserve.loadtest import format_summary, run_loadtest

    require_extras(args)
    requests, duration = args.requests, args.duration
    if requests is None and duration is None:
        requests = 50
    common = dict(
        mix=mix_of(args),
        concurrency=None if args.rate else args.concurrency,
        rate=args.rate,
        requests=requests,
        duration_s=duration,
        timeout_s=args.timeout,
        metadata=call_metadata() or (),
        on_progress=None if args.quiet else progress_line,
    )
    if args.http:
        from sdserve.loadtest.http_target import run_http_loadtest

        report = asyncio.run(run_http_loadtest(args.http, **common))
    else:
        report = asyncio.run(
            run_loadtest(
                args.server,
                application=args.application or "",
                credentials=channel_credentials(args),
                **common,
            )
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
        from sdserve.loadtest.plot import plot_report

        print(f"plot: {plot_report(report, args.plot)}")
    return 0 if summary["ok"] else 1


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


def _split(text: str | None, cast) -> tuple:
    if text is None:
        return (None,)
    return tuple(cast(x.strip()) for x in text.split(",") if x.strip())
