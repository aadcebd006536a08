"""What recording sdserve's metrics costs: throughput with metrics on against off, side by side.

    .venv/bin/python bench/bench_metrics.py [--rounds 12] [--requests 48] [--out FILE.json]

One Ray instance runs two copies of the application, `metrics.enabled` true and false, each
with its own replicas. Each round sends the same closed-loop burst (tiny model, 64x64, 10
steps, concurrency 8) to one copy and then to the other, alternating which goes first, so that
drift on this shared machine hits both alike; the ratio of each round's pair is the measurement
and the median over rounds the result. Small, fast steps are the worst case for metrics: every
U-Net step records five values and every request about ten.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import statistics
import tempfile
from pathlib import Path

import grpc

from sdserve.config import SdserveConfig
from sdserve.loadtest import Mix, drive
from sdserve.testing.tiny import make_tiny_model
from sdserve.v1 import diffusion_pb2_grpc

MIX = Mix(prompts=("a red circle on a blue background", "a green square"), steps=(10,),
          schedulers=("ddim",), widths=(64,), heights=(64,), guidances=(7.5,))  # fmt: skip
CONCURRENCY = 8
APPS = {"metrics-on": True, "metrics-off": False}


def free_port() -> int:
    from sdserve.testing.ports import free_port

    return free_port()


async def burst(target: str, app: str, requests: int) -> dict:
    """One closed-loop burst against the Serve application `app` (routed by gRPC metadata)."""
    async with grpc.aio.insecure_channel(target) as channel:
        stub = diffusion_pb2_grpc.DiffusionServiceStub(channel)

        async def send(request) -> int:
            reply = await stub.Generate(request, timeout=120, metadata=(("application", app),))
            return len(reply.images)

        report = await drive(send, mix=MIX, concurrency=CONCURRENCY, requests=requests)
    summary = report.summary()
    assert summary["errors"] == {}, summary["errors"]
    return summary


def per_call_cost(calls: int = 20_000) -> dict:
    """Microseconds per recording call, measured inside a Ray worker (where replicas record),
    with metrics on and, as the floor, off."""
    import ray

    @ray.remote(num_cpus=0)
    def measure(enabled: bool) -> dict:
        import time

        from sdserve.metrics import Metrics
        from sdserve.serve.common import ray_metric

        m = Metrics(ray_metric if enabled else None)
        calls_by_kind = {
            "histogram.observe": lambda: m.unet_step_seconds.observe(0.01),
            "counter.inc": lambda: m.denoising_steps.inc(4),
            "gauge.set": lambda: m.denoiser_running_requests.set(3),
            "tagged histogram.observe": lambda: m.stage_latency_seconds.observe(
                0.1, tags={"stage": "denoiser"}
            ),
        }
        out = {}
        for name, call in calls_by_kind.items():
            for _ in range(1000):  # warm-up
                call()
            t = time.perf_counter()
            for _ in range(calls):
                call()
            out[name] = (time.perf_counter() - t) / calls * 1e6
        return out

    return {"on": ray.get(measure.remote(True)), "off": ray.get(measure.remote(False))}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=12, help="on/off pairs (default 12)")
    parser.add_argument("--requests", type=int, default=48, help="requests per burst")
    parser.add_argument("--out", default="bench/results/metrics-overhead.json")
    parser.add_argument("--smoke", action="store_true",
                        help="2 rounds of 4 requests: checks that the script runs")  # fmt: skip
    args = parser.parse_args()
    if args.smoke:
        args.rounds, args.requests = 2, 4
    logging.basicConfig(level=logging.WARNING)

    import ray
    from ray import serve

    from sdserve.serve import server as sdserve_server
    from sdserve.serve.app import build_app

    ports = {"grpc_port": free_port(), "http_port": free_port()}
    target = f"127.0.0.1:{ports['grpc_port']}"
    rounds: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        model = make_tiny_model(Path(tmp) / "model", seed=0)

        def config(app: str) -> SdserveConfig:
            return SdserveConfig.model_validate({
                "model": {"path": str(model)},
                # Serve's gRPC proxy routes by the `application` metadata; sdserve's own front
                # door (the default) would bind one port per app and take calls for either.
                "server": {**ports, "app_name": app, "front_door": "serve-proxy"},
                "metrics": {"enabled": APPS[app], "export_port": free_port()},
                "stages": {"job_worker": {"num_replicas": 0}},  # Generate only
                "engine": {"compile": "off"},  # metrics' cost, not compilation
            })  # fmt: skip

        first = config("metrics-on")
        sdserve_server.start_ray(first)
        try:
            sdserve_server.deploy(first)  # starts Serve's proxies too
            serve.run(build_app(config("metrics-off")), name="metrics-off",
                      route_prefix="/metrics-off")  # fmt: skip
            for app in APPS:
                asyncio.run(burst(target, app, 4 if args.smoke else 16))  # warm-up
            for i in range(args.rounds):
                order = list(APPS) if i % 2 == 0 else list(reversed(APPS))
                row = {app: asyncio.run(burst(target, app, args.requests)) for app in order}
                row["on/off"] = (row["metrics-on"]["images_per_s"]
                                 / row["metrics-off"]["images_per_s"])  # fmt: skip
                print(f"round {i + 1:2d}: on {row['metrics-on']['images_per_s']:6.2f} img/s, "
                      f"off {row['metrics-off']['images_per_s']:6.2f} img/s, "
                      f"on/off {row['on/off']:.3f}", flush=True)  # fmt: skip
                rounds.append(row)
            cost = per_call_cost(1000 if args.smoke else 20_000)
        finally:
            ray.shutdown()  # and sdserve in it: Serve's graceful stop buys a bench nothing

    ratios = sorted(r["on/off"] for r in rounds)
    median = statistics.median(ratios)
    q1, _, q3 = statistics.quantiles(ratios, n=4)
    print(f"\nmetrics on/off images/s: median {median:.3f} over {len(ratios)} rounds "
          f"(quartiles {q1:.3f}..{q3:.3f})")  # fmt: skip
    print("microseconds per recording call in a Ray worker (on / off):")
    for name, us in cost["on"].items():
        print(f"  {name:<26} {us:6.2f} / {cost['off'][name]:.2f}")
    # The Denoiser records 5 values per U-Net step (3 observe/inc + 2 gauge sets).
    per_step = (
        2 * cost["on"]["histogram.observe"]
        + cost["on"]["counter.inc"]
        + 2 * cost["on"]["gauge.set"]
    )
    print(f"per U-Net step: {per_step:.1f} us, {per_step / 100:.2f}% of a 10 ms step "
          "(an optimized SD 1.5 step on an H100, DESIGN.md)")  # fmt: skip
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "setup": {"model": "tiny", "size": 64, "steps": 10, "concurrency": CONCURRENCY,
                  "requests_per_burst": args.requests},
        "rounds": rounds, "median_on_over_off": median, "quartiles": [q1, q3],
        "us_per_call": cost, "us_per_unet_step": per_step,
    }, indent=2) + "\n")  # fmt: skip
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
