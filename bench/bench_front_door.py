"""sdserve's own gRPC front door against Ray Serve's gRPC proxy, and one tenant's flood.

    .venv/bin/python bench/bench_front_door.py            # about 5 minutes
    .venv/bin/python bench/bench_front_door.py --quick    # about a minute: checks the script

With `--target`/`--proxy-target` it measures a server already running instead (the test suite
points it at its session server: `--tls-ca` for a TLS front door, `--calm-key`/`--flood-key`
for its tenants, whose flood tenant must have the limits below).

It starts one `sdserve serve` on the tiny model (eager, no JobWorker) as a user does, serving
the API twice: on its default front door (`server.front_door: sdserve`, a grpc.aio server in the
ingress replica) and through Ray Serve's gRPC proxy on a second port (`server.serve_proxy_port`,
one hop more), so both doors reach the same replicas. Each gets the same load, in the order own,
proxy (and without --quick again proxy, own, so that drift on a shared machine hits both
alike). (Two servers at once on 2 cores measured nothing: the one measured first ran 50 times
slower while the other settled.) API keys and tenant limits: `tenants: {flood: {rate_per_s: 1,
burst: 2}}`; tenant `calm` is not listed (unlimited).

single   sequential Generate calls (32x32, 4 steps), p50 latency (both servers' calls pooled);
c16      a closed loop of 16 clients: images/s through each (the median of its servers' runs);
tenants  (own front door) tenant calm's p99 latency, a closed loop of 4 clients, alone and while
         tenant flood sends 20 requests/s (20 times its rate) from an open loop; the two runs
         alternate, and p99 is taken over all the rounds of each. The flood must be refused
         RESOURCE_EXHAUSTED with a `retry-after-s` hint.

It prints a table and the ratios own/proxy (latency, images/s) and calm's loaded p99 over its
unloaded p99 (issue 27's must-show: at most 1.2); the JSON (--out) has every number.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import grpc
import yaml

from sdserve.loadtest import Mix, drive, run_loadtest
from sdserve.testing.processes import kill_session
from sdserve.testing.tiny import make_tiny_model
from sdserve.v1 import diffusion_pb2, diffusion_pb2_grpc

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_roofline import cpu_name  # noqa: E402
from bench_serving import free_port  # noqa: E402

KEYS = {"calm": "bench-calm-key-0c41", "flood": "bench-flood-key-9a7e"}
TENANTS = {"flood": {"rate_per_s": 1.0, "burst": 2}}
FLOOD_RATE = 20.0  # requests/s offered by tenant flood: 20 times its limit
MIX = Mix(prompts=("a red circle on a blue background",), steps=(4,), schedulers=("ddim",),
          widths=(32,), heights=(32,), guidances=(7.5,))  # fmt: skip


CREDENTIALS: dict[str, grpc.ChannelCredentials] = {}
"""TLS per target (a running server's TLS front door, `--tls-ca`); others are plaintext."""


def metadata(tenant: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {KEYS[tenant]}"),)


def channel(target: str) -> grpc.aio.Channel:
    credentials = CREDENTIALS.get(target)
    if credentials is None:
        return grpc.aio.insecure_channel(target)
    return grpc.aio.secure_channel(target, credentials)


def write_config(folder: Path, proxy_port: int) -> tuple[Path, Path]:
    """The server's config file (the tenants' limits, Serve's proxy on `proxy_port`, no
    JobWorker) and API key file."""
    config, keys = folder / "sdserve.yaml", folder / "keys.txt"
    config.write_text(yaml.safe_dump({"tenants": TENANTS,
                                      "server": {"serve_proxy_port": proxy_port},
                                      "stages": {"job_worker": {"num_replicas": 0}}}))  # fmt: skip
    keys.write_text("".join(f"{key} {tenant}\n" for tenant, key in KEYS.items()))
    return config, keys


def launch(model: Path, folder: Path) -> tuple[subprocess.Popen, dict[str, str], Path]:
    """Starts `sdserve serve` in its own session: (it, the gRPC target of each front door, its
    log)."""
    port, proxy_port = free_port(), free_port()
    config, keys = write_config(folder, proxy_port)
    log = folder / "sdserve.log"
    exe = Path(sys.executable).with_name("sdserve")
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [str(exe), "serve", "--model", str(model), "--grpc-port", str(port),
             "--http-port", str(free_port()), "--metrics-port", str(free_port()),
             "--compile", "off", "--config", str(config), "--api-key-file", str(keys)],
            stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )  # fmt: skip
    targets = {"sdserve": f"127.0.0.1:{port}", "serve-proxy": f"127.0.0.1:{proxy_port}"}
    return proc, targets, log


def wait_serving(proc: subprocess.Popen, target: str, log: Path, timeout_s: float = 600) -> None:
    deadline = time.monotonic() + timeout_s
    while f"serving DiffusionService on {target}" not in log.read_text(errors="replace"):
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"sdserve did not start:\n{log.read_text()[-3000:]}")
        time.sleep(0.5)


async def single(target: str, n: int) -> list[float]:
    """`n` sequential Generate calls as tenant calm: their latencies."""
    async with channel(target) as ch:
        stub = diffusion_pb2_grpc.DiffusionServiceStub(ch)
        latencies = []
        for i in range(n):
            started = time.perf_counter()
            await stub.Generate(MIX.request(i), timeout=60, metadata=metadata("calm"))
            latencies.append(time.perf_counter() - started)
    return latencies


async def c16(target: str, requests: int):
    return await run_loadtest(target, mix=MIX, concurrency=16, requests=requests, timeout_s=60,
                              metadata=metadata("calm"),
                              credentials=CREDENTIALS.get(target))  # fmt: skip


def front_door_runs(model: Path, folder: Path, args) -> dict:
    """One server, the front doors in the order sdserve, serve-proxy (and back again without
    --quick, so that drift hits both alike): single-request latency and c16 images/s through
    each; then the tenants on the own front door."""
    if args.target:
        return measure({"sdserve": args.target, "serve-proxy": args.proxy_target}, args)
    started = time.monotonic()
    proc, targets, log = launch(model, folder)
    try:
        wait_serving(proc, targets["sdserve"], log)
        print(f"serving after {time.monotonic() - started:.0f} s", flush=True)
        return measure(targets, args)
    finally:
        kill_session(proc.pid)  # a measured server has no work worth a clean stop
        proc.wait()


def measure(targets: dict[str, str], args) -> dict:
    """Each front door's single-request latency and c16 images/s, in turns; the tenants."""
    order = ("sdserve", "serve-proxy", *(() if args.quick else ("serve-proxy", "sdserve")))
    n_single, n_c16 = (6, 32) if args.quick else (40, 320)
    latencies: dict[str, list[float]] = {door: [] for door in order}
    loads: dict[str, list] = {door: [] for door in order}
    results: dict = {}
    for door in ("sdserve", "serve-proxy"):  # warm-up: the first U-Net calls, the channels
        asyncio.run(c16(targets[door], 16))
    for door in order:
        latencies[door] += asyncio.run(single(targets[door], n_single))
        loads[door].append(asyncio.run(c16(targets[door], n_c16)))
    results["tenants"] = asyncio.run(tenants(targets["sdserve"], args))
    for door in ("sdserve", "serve-proxy"):
        results[door] = {"single": _latency(latencies[door]), "c16": _throughput(loads[door])}
        print(f"{door}: single p50 {results[door]['single']['p50_s'] * 1e3:.1f} ms, "
              f"c16 {results[door]['c16']['images_per_s']:.1f} img/s", flush=True)  # fmt: skip
    return results


def _latency(latencies: list[float]) -> dict:
    return {"n": len(latencies), "p50_s": statistics.median(latencies), "min_s": min(latencies),
            "max_s": max(latencies)}  # fmt: skip


def _throughput(reports: list) -> dict:
    """The rounds' c16 runs pooled, images/s their median."""
    per_round = [report.summary()["images_per_s"] for report in reports]
    return {**_pooled(reports), "images_per_s": statistics.median(per_round),
            "images_per_s_rounds": per_round}  # fmt: skip


async def flood(target: str, duration_s: float) -> dict:
    """Tenant flood at FLOOD_RATE/s for `duration_s`: its outcomes, and how many refusals
    carried a `retry-after-s` hint."""
    hints = []
    async with channel(target) as ch:
        stub = diffusion_pb2_grpc.DiffusionServiceStub(ch)

        async def send(request: diffusion_pb2.GenerateRequest) -> int:
            try:
                reply = await stub.Generate(request, timeout=60, metadata=metadata("flood"))
            except grpc.aio.AioRpcError as exc:
                if exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
                    trailing = dict(exc.trailing_metadata() or ())
                    hints.append(float(trailing["retry-after-s"]) if "retry-after-s" in trailing
                                 else None)  # fmt: skip
                raise
            return len(reply.images)

        report = await drive(send, mix=MIX, rate=FLOOD_RATE, duration_s=duration_s)
    summary = report.summary()
    given = [h for h in hints if h is not None]
    return {"requests": summary["requests"], "ok": summary["ok"], "errors": summary["errors"],
            "refused": summary["errors"].get("RESOURCE_EXHAUSTED", 0),
            "refused_with_retry_after": len(given),
            "retry_after_s_max": max(given, default=None)}  # fmt: skip


async def tenants(target: str, args) -> dict:
    """Calm's closed loop alone and beside the flood, alternating, `rounds` times each."""
    rounds, seconds = (1, 3.0) if args.quick else (3, 20.0)
    alone, loaded, floods = [], [], []
    for _ in range(rounds):
        report = await run_loadtest(target, mix=MIX, concurrency=4, duration_s=seconds,
                                    timeout_s=60, metadata=metadata("calm"),
                                    credentials=CREDENTIALS.get(target))  # fmt: skip
        alone.append(report)
        report, flooded = await asyncio.gather(
            run_loadtest(target, mix=MIX, concurrency=4, duration_s=seconds, timeout_s=60,
                         metadata=metadata("calm"), credentials=CREDENTIALS.get(target)),
            flood(target, seconds),
        )  # fmt: skip
        loaded.append(report)
        floods.append(flooded)
    calm = {name: _pooled(reports) for name, reports in (("alone", alone), ("loaded", loaded))}
    counts = ("requests", "ok", "refused", "refused_with_retry_after")
    flood_total = {key: sum(f[key] for f in floods) for key in counts}
    flood_total["errors"] = sorted({code for f in floods for code in f["errors"]})
    flood_total["retry_after_s_max"] = max((f["retry_after_s_max"] or 0.0) for f in floods)
    ratio = calm["loaded"]["p99_s"] / calm["alone"]["p99_s"]
    return {"rounds": rounds, "seconds": seconds, "calm": calm, "flood": flood_total,
            "calm_p99_loaded_over_alone": ratio}  # fmt: skip


def _pooled(reports: list) -> dict:
    """One summary of several runs' records: requests, OK, errors, p50/p99 of OK latencies."""
    ok = sorted(r.latency_s for report in reports for r in report.ok)
    records = [r for report in reports for r in report.records]
    errors: dict[str, int] = {}
    for r in records:
        if r.code != "OK":
            errors[r.code] = errors.get(r.code, 0) + 1
    return {"requests": len(records), "ok": len(ok), "errors": errors,
            "p50_s": _rank(ok, 50), "p99_s": _rank(ok, 99)}  # fmt: skip


def _rank(sorted_values: list[float], q: float) -> float:
    """Nearest-rank percentile, as `Report.percentile`."""
    if not sorted_values:
        return float("nan")
    rank = max(1, min(len(sorted_values), math.ceil(q / 100 * len(sorted_values))))
    return sorted_values[rank - 1]


def table(results: dict) -> tuple[str, dict]:
    own, proxy, ten = results["sdserve"], results["serve-proxy"], results["tenants"]
    ratios = {
        "single p50 latency, own/proxy": own["single"]["p50_s"] / proxy["single"]["p50_s"],
        "c16 images/s, own/proxy": own["c16"]["images_per_s"] / proxy["c16"]["images_per_s"],
        "calm p99 loaded/alone": ten["calm_p99_loaded_over_alone"],
    }
    rows = [
        "| front door | single p50 (ms) | c16 images/s | c16 p50 (ms) | c16 errors |",
        "|---|---|---|---|---|",
        *(f"| {name} | {r['single']['p50_s'] * 1e3:.1f} | {r['c16']['images_per_s']:.1f} | "
          f"{r['c16']['p50_s'] * 1e3:.0f} | {r['c16']['errors'] or 'none'} |"
          for name, r in (("sdserve (own)", own), ("serve-proxy", proxy))),
        "",
        "| calm (4 clients) | requests | p50 (ms) | p99 (ms) | errors |",
        "|---|---|---|---|---|",
        *(f"| {name} | {c['requests']} | {c['p50_s'] * 1e3:.0f} | {c['p99_s'] * 1e3:.0f} | "
          f"{c['errors'] or 'none'} |" for name, c in ten["calm"].items()),
        "",
        f"flood ({FLOOD_RATE:g}/s against rate 1/s, burst 2): {ten['flood']['requests']} sent, "
        f"{ten['flood']['ok']} OK, {ten['flood']['refused']} refused RESOURCE_EXHAUSTED "
        f"({ten['flood']['refused_with_retry_after']} with retry-after-s, at most "
        f"{ten['flood']['retry_after_s_max']:.2f} s)",
        "",
        *(f"{name}: {value:.3f}" for name, value in ratios.items()),
    ]  # fmt: skip
    return "\n".join(rows), ratios


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a handful of requests per point")
    parser.add_argument("--out", help="JSON (default bench/results/front-door.json)")
    parser.add_argument("--target", help="a running sdserve's front door, HOST:PORT")
    parser.add_argument("--proxy-target", help="the same server through Serve's gRPC proxy")
    parser.add_argument("--tls-ca", help="the CA of --target's TLS certificate (PEM)")
    parser.add_argument("--calm-key", help="--target's API key of an unlimited tenant")
    parser.add_argument("--flood-key", help="--target's API key of a tenant limited as above")
    args = parser.parse_args()
    if args.target:
        KEYS.update(calm=args.calm_key, flood=args.flood_key)
        if args.tls_ca:
            ca = Path(args.tls_ca).read_bytes()
            CREDENTIALS[args.target] = grpc.ssl_channel_credentials(ca)
    with tempfile.TemporaryDirectory(prefix="bench-front-door-") as tmp:
        model = None if args.target else make_tiny_model(Path(tmp) / "tiny", seed=0)
        results = front_door_runs(model, Path(tmp), args)
    text, ratios = table(results)
    print(text, flush=True)
    out = Path(args.out or "bench/results/front-door.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    machine = {"cpu": cpu_name(), "cores": os.cpu_count(), "date": time.strftime("%Y-%m-%d")}
    out.write_text(json.dumps({"quick": args.quick, "machine": machine, "results": results,
                               "ratios": ratios, "table": text}, indent=2))  # fmt: skip
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
