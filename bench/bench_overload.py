"""sdserve under more load than it can serve: a flood, and a long soak.

    .venv/bin/python bench/bench_overload.py                  # the flood (about 3 minutes)
    .venv/bin/python bench/bench_overload.py --soak 10        # a 10-minute soak
    .venv/bin/python bench/bench_overload.py --smoke          # seconds: checks the script

Both start sdserve (default configuration, built-in model, eager) on free ports, or use the
one at `--target`.

flood  600 requests from 300 concurrent clients with 60 s deadlines, against an unflooded
       closed loop of 16 clients measured first; once with 10 steps (the work fits in the
       deadlines) and once with 50 (most of it cannot). With load shedding, every request
       either succeeds or is refused RESOURCE_EXHAUSTED at once; none is admitted and then
       runs out of time. It reports the outcomes, how fast refusals came, and OK images/s
       over the unflooded run's.
soak   a closed loop of 8 clients with mixed step counts (10/25/50) for N minutes. It reports
       each replica's resident memory after warm-up and at the end (every 30 s in the JSON),
       errors by code, and images/s per minute.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path

from sdserve.config import SdserveConfig
from sdserve.loadtest import Mix, run_loadtest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_serving import PROMPTS, add_target_arguments, sdserve_for  # noqa: E402
from profile_serving import cpu_seconds  # noqa: E402


def mix(steps: tuple[int, ...]) -> Mix:
    return Mix(prompts=PROMPTS, steps=steps, schedulers=("ddim",), widths=(64,), heights=(64,),
               guidances=(7.5,))  # fmt: skip


def flood(target: str, smoke: bool, steps: int) -> dict:
    clients, requests, deadline_s = (20, 40, 5.0) if smoke else (300, 600, 60.0)
    calm = asyncio.run(run_loadtest(target, mix=mix((steps,)), concurrency=16,
                                    requests=8 if smoke else 64))  # fmt: skip
    print(f"{steps} steps, unflooded, 16 clients: {calm.summary()['images_per_s']:.2f} img/s",
          flush=True)  # fmt: skip
    report = asyncio.run(run_loadtest(target, mix=mix((steps,)), concurrency=clients,
                                      requests=requests, timeout_s=deadline_s))  # fmt: skip
    summary = report.summary()
    refused = [r.latency_s for r in report.records if r.code == "RESOURCE_EXHAUSTED"]
    result = {
        "steps": steps, "clients": clients, "requests": requests, "deadline_s": deadline_s,
        "unflooded_images_per_s": calm.summary()["images_per_s"],
        "flood": summary,
        "refused": len(refused),
        "refused_max_latency_s": max(refused, default=0.0),
        "deadline_exceeded": summary["errors"].get("DEADLINE_EXCEEDED", 0),
        "ok_images_per_s_over_unflooded": summary["images_per_s"]
        / calm.summary()["images_per_s"],
    }  # fmt: skip
    print(f"{steps} steps, flood: {summary['ok']} OK, {len(refused)} refused (slowest refusal "
          f"{result['refused_max_latency_s']:.3f}s), {result['deadline_exceeded']} "
          f"DEADLINE_EXCEEDED, other errors {summary['errors']}; OK images/s "
          f"{summary['images_per_s']:.2f} = {result['ok_images_per_s_over_unflooded']:.2f}x "
          "the unflooded run", flush=True)  # fmt: skip
    return result


def replica_memory() -> dict[str, float]:
    """Resident MiB of every Serve replica, by deployment (several replicas: summed)."""
    out: dict[str, float] = {}
    for pid, (name, _) in cpu_seconds().items():
        if name.endswith(" replica"):
            try:
                rss = int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * 4096 / 2**20
            except OSError:
                continue
            out[name] = out.get(name, 0.0) + rss
    return out


def soak(target: str, minutes: float, warm_up: int = 48) -> dict:
    asyncio.run(run_loadtest(target, mix=mix((10, 25, 50)), concurrency=8, requests=warm_up))
    samples = [{"t_s": 0.0, "mib": replica_memory()}]
    started, records = time.monotonic(), []
    while (elapsed := time.monotonic() - started) < minutes * 60:
        interval = min(30.0, minutes * 60 - elapsed)
        report = asyncio.run(
            run_loadtest(target, mix=mix((10, 25, 50)), concurrency=8, duration_s=interval)
        )
        records.append(report.summary())
        samples.append({"t_s": time.monotonic() - started, "mib": replica_memory()})
        print(
            f"{samples[-1]['t_s']:6.0f}s: {records[-1]['images_per_s']:.2f} img/s, errors "
            f"{records[-1]['errors'] or 0}, MiB {_mib(samples[-1]['mib'])}",
            flush=True,
        )
    first, last = samples[0]["mib"], samples[-1]["mib"]
    growth = {name: last[name] / first[name] for name in first if name in last}
    errors: dict[str, int] = {}
    for r in records:
        for code, n in r["errors"].items():
            errors[code] = errors.get(code, 0) + n
    print(f"memory at the end / after warm-up: { {k: round(v, 3) for k, v in growth.items()} }; "
          f"errors {errors or 'none'}")  # fmt: skip
    return {"minutes": minutes, "memory_samples": samples, "memory_growth": growth,
            "errors": errors, "per_interval": records}  # fmt: skip


def _mib(mib: dict[str, float]) -> str:
    return ", ".join(f"{k.removesuffix(' replica')} {v:.0f}" for k, v in sorted(mib.items()))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--soak", type=float, metavar="MINUTES", help="soak instead of flood")
    parser.add_argument("--smoke", action="store_true", help="a small flood, a short soak")
    parser.add_argument("--out", help="JSON (default bench/results/overload-flood|soak.json)")
    add_target_arguments(parser)
    args = parser.parse_args()
    # eager: start-up in seconds; overload behaviour does not depend on the U-Net's speed
    target, shutdown, _ = sdserve_for(args, SdserveConfig(engine={"compile": "off"}))
    try:
        if args.soak or args.smoke:
            soaked = soak(target, 0.1, warm_up=8) if args.smoke else soak(target, args.soak)
        # 10 steps: the flood fits in its deadlines; 50 steps: most of it cannot.
        flooded = None if args.soak else [flood(target, args.smoke, n) for n in (10, 50)]
    finally:
        shutdown()
    out = Path(args.out or f"bench/results/overload-{'soak' if args.soak else 'flood'}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    report = {"flood": flooded} if not args.soak else {"soak": soaked}
    if args.smoke:
        report["soak"] = soaked
    out.write_text(json.dumps(report, indent=2))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
