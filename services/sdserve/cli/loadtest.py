"""`sdserve loadtest`: bounded closed- or open-loop gRPC load (the load generator is
sdserve.loadtest)."""

from __future__ import annotations

import argparse

from sdserve.cli.options import Parents, add_cheaper_step_options, add_image_options


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
    add_cheaper_step_options(load, lists=True)
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
    from sdserve import loadtest
    from sdserve.cli.options import call_metadata

    args.metadata = call_metadata()
    return loadtest.main(args)
