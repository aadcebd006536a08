"""The `sdserve` command, one module per group of subcommands:

    serve                   serve.py      start Ray and the application, serve until Ctrl-C
    generate, models,       generate.py   images through a running server; its models,
    loras, controlnets                    LoRA adapters and ControlNets
    submit, job             jobs.py       asynchronous jobs
    loadtest                loadtest.py   bounded gRPC load and a report
    make-tiny-model         models.py     a random-weight test model
    train-default-model,    shapes.py     the built-in default model: train it, measure it,
    eval-default-model,                   check an image against its grammar
    check-image
    train-lora              shapes_lora.py  its `cyan` adapter
    train-controlnet,       shapes_controlnet.py  its `shape` ControlNet, and a silhouette
    eval-controlnet,                      to steer it with
    shape-silhouette

Options shared by several commands are declared once, as parent parsers (options.py). Each
module imports what it needs inside its `run` function, so that `sdserve generate` starts
without importing torch or Ray.
"""

from __future__ import annotations

import argparse
import logging
import sys

from sdserve.cli import admin, generate, jobs, loadtest, models, options, serve, shapes

MODULES = (serve, generate, jobs, loadtest, models, shapes, admin)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sdserve",
        description="Stable Diffusion as Ray Serve microservices behind a gRPC API.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    parents = options.Parents()
    for module in MODULES:
        module.register(sub, parents)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
