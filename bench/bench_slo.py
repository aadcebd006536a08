"""Interactive and bulk work on one U-Net: SLO attainment and goodput against the
one-deployment baseline, interactive latency over a job backlog, tenants, and a flood.

    .venv/bin/python bench/bench_slo.py                       # the full run (about 25 minutes)
    .venv/bin/python bench/bench_slo.py --smoke               # about 2 minutes: checks it
    .venv/bin/python bench/bench_slo.py --only sweep --rates 0.5:6:6

It starts Redis, Ray, sdserve (the built-in model, its default configuration: `dtype: auto`,
`engine.compile: auto` warmed for both sizes, `engine.scheduling: priority`; API keys of three
tenants; `jobs.concurrency` = `--job-slots`; the Denoiser's torch threads pinned to
`--denoiser-threads`) and the one-deployment baseline beside it (bench_serving's `@serve.batch`
deployment of diffusers' pipeline, taking each request's sampler, float32 on one torch thread:
the best baseline bench_serving found on this machine; behind Serve's gRPC proxy, sdserve on
its own front door), on free ports, then:

sweep     Poisson rates (`--rates A:B:N`) over a mix of 10/25/50 steps, 64x64 and 64x32, and
          ddim/euler/dpmpp_2m; every request's SLO is its kind's solo time (the faster
          system's, measured at concurrency 1) times `--slo-scale`. sdserve and the baseline
          take turns at each rate, on the same arrivals. Per rate: SLO attainment, goodput,
          p50/p95/p99; at the lowest rate where the baseline's attainment is below 90%,
          sdserve's goodput over the baseline's (must be >= 2), and each system's SLO
          capacity (the highest rate with 90% met, interpolated). Draws `--plot`.
backlog   interactive Generate (25 DDIM steps) at `--interactive-rate` on an idle server, the
          jobs' throughput alone (50-step jobs kept queued), then the same interactive load
          over the backlog: interactive p99 loaded / idle (must be <= 1.5) and the jobs'
          throughput kept (must be >= 0.5); under `engine.scheduling: priority`, then again
          after redeploying with `fifo` (the old policy, for comparison).
tenants   tenant B's interactive requests (the sweep's mix, with SLOs) alone, then while
          tenant A floods bulk jobs: B's attainment drop (must be <= 5 points).
flood     `--flood-runs` floods of 600 ten-step requests from 300 clients with 60 s
          deadlines, after the unflooded rate (a closed loop at a full batch): refused,
          admitted, admitted that missed their deadline (must be 0), and refused against what
          the unflooded rate says cannot finish (within 60).

`--smoke` runs every scenario with a handful of requests and tiny step counts, eager. The JSON
(`--out`) is written after each scenario. Absolute times are not the claim: this machine is
shared and noisy; the ratios are.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_serving import PROMPTS, model_for  # noqa: E402
from slo_flood import FloodLoad, flood  # noqa: E402
from slo_jobs import BacklogLoad, backlog, tenants  # noqa: E402
from slo_report import must_show, print_summary  # noqa: E402
from slo_servers import Servers, start, wait_idle  # noqa: E402
from slo_sweep import SAMPLERS, solo_times, sweep_mix  # noqa: E402

from sdserve.config import EngineConfig  # noqa: E402
from sdserve.loadtest import Mix  # noqa: E402
from sdserve.loadtest.slo import parse_sweep  # noqa: E402
from sdserve.v1 import diffusion_pb2  # noqa: E402

SCENARIOS = ("sweep", "backlog", "tenants", "flood")
DEFAULT_OUT = Path("bench/results/bench_slo.json")
DEFAULT_PLOT = Path("bench/results/slo_sweep.png")


def arguments() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add = p.add_argument
    add("--smoke", action="store_true", help="a handful of requests per scenario, eager")
    add("--out", type=Path, default=DEFAULT_OUT, help="JSON report (default %(default)s)")
    add(
        "--plot",
        type=Path,
        help=f"the sweep's picture (default {DEFAULT_PLOT} beside the "
        "default --out, else slo_sweep.png beside --out)",
    )
    add("--only", default=",".join(SCENARIOS), help="scenarios, comma-separated (%(default)s)")
    add("--rates", help="sweep rates A:B:N, requests/s (default 0.5:4.5:5; smoke 1:3:2)")
    add("--slo-scale", type=float, default=3.0, help="SLO = solo time x this (%(default)s)")
    add("--sweep-requests", type=int, help="requests per rate and system (default 30)")
    add("--repeats", type=int, help="solo requests per kind for the SLO basis (default 2)")
    add("--interactive-rate", type=float, help="backlog, tenants: requests/s (default 0.5)")
    add("--interactive-requests", type=int, help="backlog, tenants: per run (default 30)")
    add("--job-slots", type=int, help="jobs.concurrency (default 16: the engine's full batch)")
    add("--max-jobs", type=int, help="most jobs one backlog submits (default 600)")
    add("--unloaded-s", type=float, help="seconds the jobs' throughput alone is measured (20)")
    add("--flood-runs", type=int, help="floods (default 3)")
    add("--flood-steps", type=int, default=10, help="steps of the flood's requests (%(default)s)")
    add("--denoiser-threads", default="1", help="the Denoiser's torch_threads: 1 (default: "
        "what `auto` picks for this model on the idle machine; pinned, so that a busy start-up "
        "cannot give the two deployments different plans) or auto")  # fmt: skip
    args = p.parse_args()
    smoke = args.smoke
    defaults = dict(
        rates="1:3:2" if smoke else "0.5:4.5:5",
        sweep_requests=4 if smoke else 30,
        repeats=1 if smoke else 2,
        interactive_rate=2.0 if smoke else 0.5,
        interactive_requests=4 if smoke else 30,
        job_slots=4 if smoke else 16,
        max_jobs=80 if smoke else 600,
        unloaded_s=2.0 if smoke else 20.0,
        flood_runs=1 if smoke else 3,
    )
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    args.only = [s for s in args.only.split(",") if s]
    if unknown := set(args.only) - set(SCENARIOS):
        p.error(f"--only: no scenario {sorted(unknown)}; choose from {SCENARIOS}")
    if args.plot is None:
        args.plot = DEFAULT_PLOT if args.out == DEFAULT_OUT else args.out.parent / DEFAULT_PLOT.name
    return args


@dataclasses.dataclass(frozen=True)
class Loads:
    """Every scenario's load, from the arguments."""

    sweep: Mix
    backlog: BacklogLoad
    tenants: BacklogLoad
    flood: FloodLoad


def loads(args, size: int) -> Loads:
    smoke = args.smoke
    steps = (2, 3, 4) if smoke else (10, 25, 50)
    sweep = sweep_mix(PROMPTS, size, steps)
    interactive = Mix(
        prompts=PROMPTS,
        steps=(4 if smoke else 25,),
        schedulers=("ddim",),
        widths=(size,),
        heights=(size,),
        guidances=(7.5,),
    )
    bulk = diffusion_pb2.GenerateRequest(
        prompt="a bulk job: a blue square on a red background",
        steps=20 if smoke else 50,
        scheduler="ddim",
        width=size,
        height=size,
        guidance_scale=7.5,
    )
    backlog_load = BacklogLoad(
        interactive,
        args.interactive_rate,
        args.interactive_requests,
        bulk,
        2 * args.job_slots,
        args.max_jobs,
        args.unloaded_s,
    )
    # tenant A's flood: a burst of 8 batches' worth of jobs, kept that deep
    tenants_load = dataclasses.replace(backlog_load, interactive=sweep, ahead=8 * args.job_slots)
    flood_mix = dataclasses.replace(interactive, steps=(args.flood_steps,))
    flood_load = FloodLoad(
        flood_mix,
        *((40, 20, 5.0) if smoke else (600, 300, 60.0)),
        runs=args.flood_runs,
        batch=EngineConfig().max_batch_size,
        calm_requests=8 if smoke else 64,
    )
    return Loads(sweep, backlog_load, tenants_load, flood_load)


class Run:
    """One run: the servers, the results so far (written after each scenario), timings."""

    def __init__(self, args, servers: Servers, setup: dict):
        self.args, self.servers = args, servers
        self.result: dict = {"setup": setup, "timings_s": dict(servers.started_s)}
        self.basis: dict | None = None

    def scenario(self, name: str, fn) -> None:
        print(f"\n{name} ...", flush=True)
        t = time.perf_counter()
        value = fn()
        self.result["timings_s"][name] = time.perf_counter() - t
        if "." in name:  # backlog.priority
            outer, inner = name.split(".")
            self.result.setdefault(outer, {})[inner] = value
        else:
            self.result[name] = value
        self.write()

    def write(self) -> None:
        self.args.out.parent.mkdir(parents=True, exist_ok=True)
        self.args.out.write_text(json.dumps(self.result, indent=2, default=str))


def measure(run: Run, work: Loads) -> None:
    """The scenarios on the priority deployment, then the fifo one's backlog."""
    import asyncio

    from slo_sweep import run_sweep

    args, servers = run.args, run.servers
    rates = parse_sweep(args.rates)
    if "sweep" in args.only:

        def sweep() -> dict:
            result, run.basis = run_sweep(servers, work.sweep, rates, args, args.plot)
            return result

        run.scenario("sweep", sweep)
    if "backlog" in args.only:
        run.scenario("backlog.priority", lambda: _backlog(servers, work.backlog))
    if "tenants" in args.only:
        if run.basis is None:  # no sweep: sdserve's own solo times
            solo = asyncio.run(solo_times(servers, work.sweep, args.repeats, ("sdserve",)))
            run.basis = solo["basis"]
        run.scenario("tenants", lambda: _tenants(servers, work.tenants, run.basis, args))
    if "flood" in args.only:
        run.scenario("flood", lambda: flood(servers, work.flood))
    if "backlog" in args.only:
        print("\nredeploying with engine.scheduling: fifo ...", flush=True)
        run.result["timings_s"]["redeploy_fifo"] = servers.redeploy("fifo")
        run.scenario("backlog.fifo", lambda: _backlog(servers, work.backlog))


def _backlog(servers: Servers, load: BacklogLoad) -> dict:
    import asyncio

    result = asyncio.run(backlog(servers, load))
    result["idle_wait_after_s"] = wait_idle()
    print(
        f"  interactive p99 idle {result['idle']['p99_s']:.2f}s, over the backlog "
        f"{result['loaded']['p99_s']:.2f}s: {result['p99_loaded_over_idle']:.2f}x; jobs/s "
        f"alone {result['jobs_per_s_unloaded']:.2f}, under interactive load "
        f"{result['jobs_per_s_loaded']:.2f}: {result['jobs_kept'] or 0:.2f} kept",
        flush=True,
    )
    return result


def _tenants(servers: Servers, load: BacklogLoad, basis: dict, args) -> dict:
    import asyncio

    result = asyncio.run(tenants(servers, load, basis, args.slo_scale))
    result["idle_wait_after_s"] = wait_idle()
    print(
        f"  tenant B attainment alone {result['alone']['slo_attainment']:.1%}, during tenant "
        f"A's flood {result['flooded']['slo_attainment']:.1%}: drop "
        f"{result['attainment_drop_points']:.1f} points",
        flush=True,
    )
    return result


def _load() -> str:
    """/proc/loadavg: how busy the shared machine was."""
    return Path("/proc/loadavg").read_text().strip()


def _cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return ""


def main() -> int:
    args = arguments()
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        model, size, _ = model_for("default", Path(tmp))
        engine = {
            "scheduling": "priority",
            "compile_sizes": [[size, size // 2]],
            **({"compile": "off"} if args.smoke else {}),
        }
        load_at_start = _load()
        threads = int(args.denoiser_threads) if args.denoiser_threads.isdigit() else "auto"
        servers = start(Path(tmp), model, SAMPLERS, job_slots=args.job_slots, engine=engine,
                        denoiser_threads=threads)  # fmt: skip
        setup = {"model": "default", "size": size, "engine": engine, "job_slots": args.job_slots,
                 "denoiser_threads": threads, "cpus": os.cpu_count(), "cpu": _cpu_model(),
                 "torch": torch.__version__, "smoke": args.smoke, "loadavg_at_start": load_at_start,
                 "args": {k: str(v) for k, v in vars(args).items()}}  # fmt: skip
        run = Run(args, servers, setup)
        try:
            measure(run, loads(args, size))
        finally:
            servers.stop()
    run.result["timings_s"]["total"] = time.perf_counter() - started
    run.result["setup"]["loadavg_at_end"] = _load()
    run.result["must_show"] = must_show(run.result)
    run.write()
    print_summary(run.result)
    print(f"\nwrote {args.out}" + (f" and {args.plot}" if "sweep" in run.result else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
