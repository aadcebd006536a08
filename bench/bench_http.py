"""The OpenAI-compatible HTTP API against the gRPC API, side by side on one server.

    .venv/bin/python bench/bench_http.py [--rounds 3] [--requests 96] [--concurrency 16]
                                         [--steps 25] [--smoke] [--out FILE.json]

sdserve (its default configuration, the built-in model, no job workers) starts on free ports,
or `--target` and `--http-url` name one running.
The load tester's closed loop (`sdserve.loadtest`) sends the same requests (the built-in
model's 64x64, DDIM, guidance 7.5) over gRPC (`Generate`) and over HTTP (`POST
/v1/images/generations`, `response_format: b64_json`, through Serve's HTTP proxy), alternating
round by round so that drift on a shared machine hits both alike. For scale, the same requests
run one at a time in diffusers' `StableDiffusionPipeline` in this process (what a script would
do), the external baseline.

It prints images/s per round and the ratio HTTP / gRPC of the rounds' medians; the JSON has
every number. The claim is the ratio, not the absolute images/s: this machine is shared.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
from pathlib import Path

from sdserve.config import SdserveConfig
from sdserve.constants import DEFAULT_MODEL_DIR
from sdserve.loadtest import Mix, drive, run_loadtest
from sdserve.loadtest.http_target import run_http_loadtest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_serving import (  # noqa: E402
    PROMPTS,
    InProcessDiffusers,
    add_target_arguments,
    sdserve_for,
)


def mix(steps: int) -> Mix:
    return Mix(prompts=PROMPTS, steps=(steps,), schedulers=("ddim",), widths=(64,),
               heights=(64,), guidances=(7.5,))  # fmt: skip


def rounds(target: str, url: str, args) -> dict[str, list[dict]]:
    load = dict(mix=mix(args.steps), concurrency=args.concurrency, requests=args.requests)
    results: dict[str, list[dict]] = {"grpc": [], "http": []}
    for i in range(args.rounds):
        order = ("grpc", "http") if i % 2 == 0 else ("http", "grpc")  # neither always first
        for api in order:
            if api == "grpc":
                report = asyncio.run(run_loadtest(target, **load))
            else:
                report = asyncio.run(run_http_loadtest(url, **load))
            summary = report.summary()
            results[api].append(summary)
            print(f"  round {i + 1} {api:>4}: {summary['images_per_s']:6.2f} img/s, p50 "
                  f"{summary['p50_s']:.3f}s, p99 {summary['p99_s']:.3f}s, errors "
                  f"{summary['errors'] or 0}", flush=True)  # fmt: skip
    return results


def diffusers_baseline(args) -> dict:
    """The same requests one at a time in diffusers' pipeline (a few, for scale)."""
    pipe = InProcessDiffusers(DEFAULT_MODEL_DIR)
    n = 2 if args.smoke else 8
    report = asyncio.run(drive(pipe.send, mix=mix(args.steps), concurrency=1, requests=n))
    summary = report.summary()
    print(f"  diffusers, one at a time: {summary['images_per_s']:6.2f} img/s", flush=True)
    return summary


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3, help="rounds per API (default 3)")
    parser.add_argument("--requests", type=int, default=96, help="requests per round")
    parser.add_argument("--concurrency", type=int, default=16, help="clients (default 16)")
    parser.add_argument("--steps", type=int, default=25, help="denoising steps (default 25)")
    parser.add_argument("--smoke", action="store_true", help="seconds: checks the script")
    parser.add_argument("--out", help="JSON (default bench/results/http-vs-grpc.json)")
    add_target_arguments(parser)
    args = parser.parse_args()
    if args.smoke:
        args.rounds, args.requests, args.concurrency, args.steps = 1, 4, 2, 2
    # eager: HTTP against gRPC on the same server, not compilation (bench_serving.py has it)
    target, shutdown, url = sdserve_for(args, SdserveConfig(engine={"compile": "off"}))
    try:
        results = rounds(target, url, args)
    finally:
        shutdown()
    baseline = diffusers_baseline(args)
    medians = {api: statistics.median(r["images_per_s"] for r in runs)
               for api, runs in results.items()}  # fmt: skip
    ratio = medians["http"] / medians["grpc"] if medians["grpc"] else float("nan")
    print(f"images/s, median of {args.rounds} rounds at concurrency {args.concurrency}: "
          f"gRPC {medians['grpc']:.2f}, HTTP {medians['http']:.2f}, HTTP / gRPC {ratio:.3f}; "
          f"diffusers one at a time {baseline['images_per_s']:.2f}")  # fmt: skip
    out = Path(args.out or "bench/results/http-vs-grpc.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    report = {"args": vars(args), "rounds": results, "median_images_per_s": medians,
              "http_over_grpc": ratio, "diffusers_one_at_a_time": baseline}  # fmt: skip
    out.write_text(json.dumps(report, indent=2))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
