"""sdserve against what a user would otherwise run, side by side in one run on one machine.

    .venv/bin/python bench/bench_serving.py [--model default|tiny-sd15-layout|tiny]
                                            [--smoke] [--out FILE.json] [--plots DIR]
    .venv/bin/python bench/bench_serving.py --sd15-single    # SD 1.5's full size, one request

These systems serve the same model with the same settings (DDIM, guidance 7.5):

  diffusers      diffusers' StableDiffusionPipeline in this process, one request at a time,
                 torch on every core, float32 (what a script would do);
  rayserve       ONE Ray Serve deployment holding that pipeline, whole requests batched with
                 `@serve.batch(max_batch_size=8)` and one pipeline call per group of requests
                 that share steps, guidance and size (the shape of Ray Serve's own Stable
                 Diffusion example), at Serve's default options, behind the same gRPC proxy,
                 with its torch on every core (`torch.set_num_threads`), float32;
  rayserve-bf16  the same deployment loaded with `torch_dtype=torch.bfloat16`;
  rayserve-1t    the same in float32 on the one torch thread Ray gives a replica (OMP_NUM_THREADS
                 = its num_cpus): on this project's 2-core machine it beat every core;
  sdserve        sdserve's application with its default configuration (`dtype: auto`,
                 `engine.compile: auto`, `torch_threads: auto`);
  sdserve-fp32   the same application's second model: the same folder with `dtype: float32`.

Loads, driven by sdserve's own load generator (`sdserve.loadtest.drive`), each system's runs
interleaved so that drift on a shared machine hits all three alike:

  single   one request at a time: latency (every system);
  c1, c4   closed loop with 1 and 4 clients (diffusers, rayserve, sdserve);
  c16      closed loop with 16 clients, uniform steps: images/s and latency (every system);
  mixed    open loop, Poisson arrivals at 70% of rayserve's peak, steps mixed 10/25/50;
  job      sdserve only: SubmitJob until WatchJob returns the images, against Generate.

It prints ratios (sdserve over each other system), sdserve's U-Net busy share of each run (the
Denoiser's seconds in U-Net steps over the run's wall time) and its recompiles, and draws one
picture per run (`sdserve.loadtest.plot`). The JSON has every number. Absolute times are not
the claim: this machine is shared and noisy. `--smoke` runs a few requests per point with eager
U-Nets.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import logging
import os
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from ray import serve

from sdserve.config import SdserveConfig
from sdserve.constants import DEFAULT_MODEL_DIR
from sdserve.loadtest import Mix, Report, drive, run_loadtest
from sdserve.testing.tiny import make_tiny_model
from sdserve.v1 import diffusion_pb2

SCHEDULER, GUIDANCE = "ddim", 7.5
PROMPTS = tuple(f"a {c} {s} on a {b} background" for c, s, b in [
    ("red", "circle", "blue"), ("green", "square", "white"), ("yellow", "triangle", "black"),
    ("purple", "circle", "orange"),
])  # fmt: skip
MIXED_STEPS = (10, 25, 50)


@serve.deployment(name="DiffusersBatch")
class DiffusersBatch:
    """The baseline: one deployment, diffusers' pipeline, whole requests batched (about 40 lines,
    as a user would write it). Serves DiffusionService.Generate through Serve's gRPC proxy.

    Its torch runs on every core of the machine (Ray would give it one thread: it sets
    OMP_NUM_THREADS to the actor's num_cpus), in `dtype` ("float32", diffusers' default, or
    "bfloat16", as a user who tunes it for a CPU with bf16 matmuls would)."""

    def __init__(self, model: str, dtype: str = "float32", threads: int | None = None):
        from diffusers import DDIMScheduler, StableDiffusionPipeline

        self.torch = ThreadPoolExecutor(max_workers=1)  # the event loop keeps taking requests
        self.torch.submit(torch.set_num_threads, threads or os.cpu_count() or 1).result()
        self.pipe = StableDiffusionPipeline.from_pretrained(
            model, torch_dtype=getattr(torch, dtype), local_files_only=True, safety_checker=None
        )
        self.pipe.scheduler = DDIMScheduler.from_config(self.pipe.scheduler.config)
        self.pipe.set_progress_bar_config(disable=True)
        self.size = self.pipe.unet.config.sample_size * self.pipe.vae_scale_factor

    async def Generate(self, request: diffusion_pb2.GenerateRequest):
        return await self.batched(request)

    @serve.batch(max_batch_size=8)
    async def batched(self, requests: list) -> list:
        groups: dict[tuple, list[int]] = {}
        for i, r in enumerate(requests):  # diffusers takes one step count etc. per call
            key = (r.steps or 25, r.guidance_scale or GUIDANCE, r.width or self.size,
                   r.height or self.size)  # fmt: skip
            groups.setdefault(key, []).append(i)
        replies: list = [None] * len(requests)
        loop = asyncio.get_running_loop()
        for (steps, guidance, width, height), members in groups.items():
            group = [requests[i] for i in members]
            images = await loop.run_in_executor(
                self.torch, self.call, group, steps, guidance, width, height
            )
            for i, image in zip(members, images, strict=True):
                replies[i] = _response(image, requests[i].seed)
        return replies

    def call(self, group: list, steps: int, guidance: float, width: int, height: int) -> list:
        return self.pipe(
            [r.prompt for r in group], num_inference_steps=steps, guidance_scale=guidance,
            width=width, height=height,
            generator=[torch.Generator("cpu").manual_seed(r.seed) for r in group],
        ).images  # fmt: skip


def _response(image, seed: int) -> diffusion_pb2.GenerateResponse:
    import io

    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return diffusion_pb2.GenerateResponse(images=[diffusion_pb2.Image(
        png=buf.getvalue(), seed=seed, width=image.width, height=image.height)])  # fmt: skip


class InProcessDiffusers:
    """System `diffusers`: one pipeline call per request, on one thread of this process."""

    def __init__(self, model: Path):
        from diffusers import DDIMScheduler, StableDiffusionPipeline

        self.torch = ThreadPoolExecutor(max_workers=1)
        self.torch.submit(torch.set_num_threads, os.cpu_count() or 1).result()
        self.pipe = self.torch.submit(
            StableDiffusionPipeline.from_pretrained,
            model,
            torch_dtype=torch.float32,
            local_files_only=True,
        ).result()
        self.pipe.scheduler = DDIMScheduler.from_config(self.pipe.scheduler.config)
        self.pipe.set_progress_bar_config(disable=True)

    def _call(self, r: diffusion_pb2.GenerateRequest) -> int:
        self.pipe(r.prompt, num_inference_steps=r.steps, guidance_scale=r.guidance_scale,
                  width=r.width, height=r.height, output_type="np",
                  generator=torch.Generator("cpu").manual_seed(r.seed))  # fmt: skip
        return 1

    async def send(self, request: diffusion_pb2.GenerateRequest) -> int:
        return await asyncio.get_running_loop().run_in_executor(self.torch, self._call, request)


BASELINES = {"rayserve": dict(dtype="float32"), "rayserve-bf16": dict(dtype="bfloat16"),
             "rayserve-1t": dict(dtype="float32", threads=1)}  # fmt: skip
"""The one-deployment baselines: Serve application name -> DiffusersBatch's arguments."""
SDSERVE = {"sdserve": "", "sdserve-fp32": "fp32"}
"""sdserve's systems: system -> served model name ("": the default)."""
SYSTEMS = ["diffusers", *BASELINES, *SDSERVE]


class Bench:
    """The systems on one model, and the load points."""

    def __init__(self, model: Path, size: int, steps: int, target: str, smoke: bool):
        self.model, self.size, self.steps, self.target = model, size, steps, target
        self.smoke = smoke
        self.diffusers = InProcessDiffusers(model)
        self.results: dict[str, dict] = {system: {} for system in SYSTEMS}
        self.reports: dict[str, Report] = {}

    def mix(self, steps: tuple[int, ...] | None = None) -> Mix:
        return Mix(prompts=PROMPTS, steps=steps or (self.steps,), schedulers=(SCHEDULER,),
                   widths=(self.size,), heights=(self.size,), guidances=(GUIDANCE,))  # fmt: skip

    async def load(self, system: str, mix: Mix, **load) -> Report:
        if system == "diffusers":
            return await drive(self.diffusers.send, mix=mix, **load)
        if system in SDSERVE:
            mix = dataclasses.replace(mix, models=(SDSERVE[system],))
            return await run_loadtest(self.target, mix=mix, application="sdserve", **load)
        return await run_loadtest(self.target, mix=mix, application=system, **load)

    def run(self, label: str, systems: list[str], mix: Mix, **load) -> None:
        for system in systems:
            stats = denoiser_stats(system) if system in SDSERVE else None
            report = asyncio.run(self.load(system, mix, **load))
            summary = report.summary()
            extra = ""
            if stats is not None:
                after = denoiser_stats(system)
                summary["unet_busy"] = (after.unet_seconds - stats.unet_seconds) / report.wall_s
                summary["recompiles"] = after.recompiles - stats.recompiles
                extra = (f", U-Net busy {summary['unet_busy']:.0%}, recompiles "
                         f"{summary['recompiles']}")  # fmt: skip
            self.results[system][label] = summary
            self.reports[f"{system}-{label}"] = report
            print(f"  {system:>13} {label:>7}: {summary['images_per_s']:6.2f} img/s, p50 "
                  f"{summary['p50_s']:.3f}s, p99 {summary['p99_s']:.3f}s, errors "
                  f"{summary['errors'] or 0}{extra}", flush=True)  # fmt: skip


def denoiser_stats(system: str = "sdserve"):
    from sdserve.v1 import stages_pb2

    name = f"Denoiser-{SDSERVE[system]}" if SDSERVE[system] else "Denoiser"
    handle = serve.get_deployment_handle(name, app_name="sdserve")
    return stages_pb2.DenoiserStats.FromString(handle.Stats.remote(b"").result(timeout_s=30))


async def job_vs_generate(target: str, request: diffusion_pb2.GenerateRequest, n: int) -> dict:
    """Median seconds of Generate and of SubmitJob -> WatchJob's last message, alternating."""
    import grpc

    from sdserve.v1 import diffusion_pb2_grpc

    meta = (("application", "sdserve"),)
    generate, job = [], []
    async with grpc.aio.insecure_channel(target) as channel:
        stub = diffusion_pb2_grpc.DiffusionServiceStub(channel)
        for i in range(n):
            request.seed = i
            t = time.perf_counter()
            await stub.Generate(request, metadata=meta, timeout=120)
            generate.append(time.perf_counter() - t)
            t = time.perf_counter()
            submit = diffusion_pb2.SubmitJobRequest(request=request)
            job_id = (await stub.SubmitJob(submit, metadata=meta, timeout=30)).job_id
            watch = stub.WatchJob(diffusion_pb2.GetJobRequest(job_id=job_id), metadata=meta,
                                  timeout=120)  # fmt: skip
            last = [job async for job in watch][-1]
            assert last.state == diffusion_pb2.JOB_STATE_SUCCEEDED, last
            job.append(time.perf_counter() - t)
    g, j = statistics.median(generate), statistics.median(job)
    return {"generate_s": g, "job_s": j, "job_over_generate": j / g, "n": n}


def deploy(model: Path, target_ports: dict, redis_url: str, smoke: bool) -> str:
    """sdserve (its default, and the same folder in float32 as model "fp32", which reserves no
    CPU so that both fit) and the baselines, each an application of its own."""
    from sdserve.serve import server as sdserve_server

    fp32 = {"name": "fp32", "path": str(model), "dtype": "float32",
            "stages": {"denoiser": {"num_cpus": 0, "max_ongoing_requests": 4096}}}  # fmt: skip
    # Serve's gRPC proxy routes by the `application` metadata to the baselines; sdserve's own
    # front door (the default) would answer every call itself, baselines' included.
    config = SdserveConfig.model_validate({
        "models": [{"name": "default", "path": str(model)}, fp32],
        "server": {**target_ports, "front_door": "serve-proxy"}, "jobs": {"redis_url": redis_url},
        "metrics": {"export_port": free_port()},
        **({"engine": {"compile": "off"}} if smoke else {}),  # smoke: start in seconds
    })  # fmt: skip
    sdserve_server.start_ray(config)
    sdserve_server.deploy(config)  # Serve's proxies (with DiffusionService) and sdserve's app
    target = f"127.0.0.1:{config.server.grpc_port}"
    sdserve_server.wait_healthy(target, timeout_s=900)  # before a second app: then calls must
    baseline = DiffusersBatch.options(ray_actor_options={"num_cpus": 0})  # name theirs; no CPU
    serve.run_many([  # reserved, so that all fit; deployed together, as their replicas start
        serve.RunTarget(baseline.bind(str(model), **kwargs), name=app, route_prefix=f"/{app}")
        for app, kwargs in BASELINES.items()
    ])  # fmt: skip
    check_routing(target)
    return target


def check_routing(target: str) -> None:
    """Each system answers its own calls: sdserve's replies carry a request id, the baselines'
    none. (A bench whose calls all reached sdserve would time it under every name.)"""
    import grpc

    from sdserve.v1 import diffusion_pb2_grpc

    request = diffusion_pb2.GenerateRequest(prompt=PROMPTS[0], steps=1, width=64, height=64)
    with grpc.insecure_channel(target) as channel:
        stub = diffusion_pb2_grpc.DiffusionServiceStub(channel)
        for app in ("sdserve", *BASELINES):
            reply = stub.Generate(request, metadata=(("application", app),), timeout=300)
            if bool(reply.request_id) != (app == "sdserve"):
                raise RuntimeError(f"a call for application {app!r} was not answered by it")


def add_target_arguments(parser: argparse.ArgumentParser) -> None:
    """--target and --http-url: bench a running sdserve instead of starting one."""
    parser.add_argument("--target", help="HOST:PORT of a running sdserve's gRPC API, in the "
                        "configuration this script starts (default: start one)")  # fmt: skip
    parser.add_argument("--http-url", help="with --target: its HTTP API's base URL")


def sdserve_for(args, config: SdserveConfig):
    """(gRPC target, shutdown, HTTP API base URL) of the running sdserve `--target`, else of
    one started here with `config` by `deploy_sdserve_only` (then shutdown stops it)."""
    if args.target:
        return args.target, lambda: None, args.http_url
    return deploy_sdserve_only(config)


def deploy_sdserve_only(config: SdserveConfig):
    """Starts Ray and sdserve alone (free ports, no JobWorker); returns (gRPC target,
    shutdown, HTTP API base URL)."""
    from sdserve.serve import server as sdserve_server

    tree = config.model_dump()
    tree["server"].update(grpc_port=free_port(), http_port=free_port())
    tree["metrics"]["export_port"] = free_port()
    tree["stages"]["job_worker"]["num_replicas"] = 0
    config = SdserveConfig.model_validate(tree)
    sdserve_server.start_ray(config)
    sdserve_server.deploy(config)
    target = f"127.0.0.1:{config.server.grpc_port}"
    sdserve_server.wait_healthy(target, timeout_s=600)
    return target, stop_ray, f"http://127.0.0.1:{config.server.http_port}"


def stop_ray() -> None:
    """Stops the Ray instance this script started, and sdserve in it, at once: Serve's graceful
    stop (replicas finishing their requests, about 5 s here) buys a finished bench nothing."""
    import ray

    ray.shutdown()


def free_port() -> int:
    from sdserve.testing.ports import free_port

    return free_port()


def measure(bench: Bench, args) -> dict:
    systems = ["diffusers", "rayserve", "sdserve"]
    smoke = args.smoke
    for system in SYSTEMS:  # warm-up
        asyncio.run(bench.load(system, bench.mix(), concurrency=2, requests=2))
    print("single requests ...", flush=True)
    bench.run("single", SYSTEMS, bench.mix(), concurrency=1, requests=2 if smoke else 8)
    for c in (1, 4, 16):
        n = {1: 2, 4: 4, 16: 16}[c] if smoke else {1: 8, 4: 16, 16: 48}[c]
        print(f"closed loop, {c} clients ...", flush=True)
        bench.run(f"c{c}", SYSTEMS if c == 16 else systems, bench.mix(), concurrency=c,
                  requests=n)  # fmt: skip
    print("peak of rayserve on mixed steps ...", flush=True)
    mixed = bench.mix((2, 3, 4) if smoke else MIXED_STEPS)
    bench.run("mixed-c16", ["rayserve"], mixed, concurrency=16, requests=16 if smoke else 48)
    rate = 0.7 * bench.results["rayserve"]["mixed-c16"]["images_per_s"]
    print(f"open loop at {rate:.2f} requests/s, steps {MIXED_STEPS} ...", flush=True)
    n = 6 if smoke else 120
    bench.run("mixed70", ["rayserve", "sdserve"], mixed, rate=rate, requests=n, duration_s=600)
    print("job against Generate ...", flush=True)
    request = bench.mix().request(0)
    jobs = asyncio.run(job_vs_generate(bench.target, request, 2 if smoke else 12))
    print(f"  job {jobs['job_s']:.3f}s, Generate {jobs['generate_s']:.3f}s: "
          f"{jobs['job_over_generate']:.3f}x", flush=True)  # fmt: skip
    return {"rate_mixed70": rate, "jobs": jobs}


def ratios(results: dict) -> dict:
    s, r, d = results["sdserve"], results["rayserve"], results["diffusers"]
    out = {f"sdserve/rayserve images/s, c{c}": s[f"c{c}"]["images_per_s"]
           / r[f"c{c}"]["images_per_s"] for c in (1, 4, 16)}  # fmt: skip
    c16 = {system: results[system]["c16"]["images_per_s"] for system in SYSTEMS}
    for other in ("sdserve-fp32", "rayserve-bf16", "rayserve-1t"):
        out[f"sdserve/{other} images/s, c16"] = c16["sdserve"] / c16[other]
    best = max(BASELINES, key=lambda b: c16[b])
    out[f"sdserve/best baseline ({best}) images/s, c16"] = c16["sdserve"] / c16[best]
    out.update({
        "sdserve/diffusers images/s, c16": s["c16"]["images_per_s"] / d["c16"]["images_per_s"],
        "sdserve/rayserve p50, mixed 70%": s["mixed70"]["p50_s"] / r["mixed70"]["p50_s"],
        "sdserve/rayserve p99, mixed 70%": s["mixed70"]["p99_s"] / r["mixed70"]["p99_s"],
        "sdserve/rayserve images/s, mixed 70%": s["mixed70"]["images_per_s"]
        / r["mixed70"]["images_per_s"],
        "sdserve/diffusers single-request latency": s["single"]["p50_s"] / d["single"]["p50_s"],
        "sdserve U-Net busy, c16": s["c16"]["unet_busy"],
    })  # fmt: skip
    return out


def sd15_single(args) -> int:
    """SD 1.5's full architecture (random weights, diffusers' classes), 512x512, DPM-Solver++
    (`--sd15-steps`), one request at a time: diffusers in this process in float32 (its
    default) and in bfloat16 (`torch_dtype=torch.bfloat16`, by hand), both on every core,
    against sdserve's default configuration (no Ray Serve baseline: one request has nothing to
    batch). `--smoke` runs the tiny model instead, eager, to check the script."""
    import copy

    from diffusers import DPMSolverMultistepScheduler

    from sdserve.pipeline.models import save_sd_folder, sd_pipeline
    from sdserve.testing.architectures import random_parts

    arch, size = ("tiny", 64) if args.smoke else ("sd15", 512)
    with tempfile.TemporaryDirectory() as tmp:
        parts = random_parts(arch)
        pipes = {"float32": sd_pipeline(parts["vae"], parts["text_encoder"], parts["tokenizer"],
                                        parts["unet"])}  # fmt: skip
        save_sd_folder(pipes["float32"], Path(tmp) / arch)
        pipes["bfloat16"] = copy.deepcopy(pipes["float32"]).to(torch.bfloat16)
        for pipe in pipes.values():
            pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)
            pipe.set_progress_bar_config(disable=True)
        request = diffusion_pb2.GenerateRequest(
            prompt=PROMPTS[0], steps=args.sd15_steps, width=size, height=size,
            scheduler="dpmpp_2m", guidance_scale=GUIDANCE,
        )  # fmt: skip
        ports = {"grpc_port": free_port(), "http_port": free_port()}
        config = SdserveConfig.model_validate({
            "model": {"path": str(Path(tmp) / arch)}, "server": ports,
            "metrics": {"export_port": free_port()}, "stages": {"job_worker": {"num_replicas": 0}},
            **({"engine": {"compile": "off"}} if args.smoke else {}),
        })  # fmt: skip
        from sdserve.serve import server as sdserve_server

        sdserve_server.start_ray(config)
        try:
            sdserve_server.deploy(config)
            target = f"127.0.0.1:{ports['grpc_port']}"
            sdserve_server.wait_healthy(target, timeout_s=1200)
            result = _single_runs(pipes, request, target, args.runs)
        finally:
            stop_ray()
    print(f"{arch} {size}x{size}, {request.steps} steps: diffusers float32 "
          f"{result['diffusers_float32_s']:.1f}s, diffusers bfloat16 "
          f"{result['diffusers_bfloat16_s']:.1f}s, sdserve {result['sdserve_s']:.1f}s "
          f"({result['sdserve_timings']}): {result['sdserve_over_diffusers_float32']:.2f}x and "
          f"{result['sdserve_over_diffusers_bfloat16']:.2f}x")  # fmt: skip
    out = Path(args.out or "bench/results/serving-sd15-single.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    setup = {"arch": arch, "size": size, "steps": request.steps, "scheduler": "dpmpp_2m",
             "cpus": os.cpu_count(), "torch": torch.__version__, "smoke": args.smoke}  # fmt: skip
    out.write_text(json.dumps({"setup": setup, **result}, indent=2))
    print(f"wrote {out}")
    return 0


def _single_runs(pipes: dict, request, target: str, runs: int) -> dict:
    """Median seconds of one request in each diffusers pipeline and through sdserve, in turn."""
    import grpc

    from sdserve.v1 import diffusion_pb2_grpc

    torch.set_num_threads(os.cpu_count() or 1)
    size = request.width
    seconds: dict[str, list[float]] = {name: [] for name in [*pipes, "sdserve"]}
    timings = None
    with grpc.insecure_channel(target) as channel:
        stub = diffusion_pb2_grpc.DiffusionServiceStub(channel)
        stub.Generate(request, timeout=3600)  # warm-up of all three
        for pipe in pipes.values():
            pipe(request.prompt, num_inference_steps=1, width=size, height=size, output_type="np")
        for i in range(runs):
            for name, pipe in pipes.items():
                t = time.perf_counter()
                pipe(request.prompt, num_inference_steps=request.steps, width=size, height=size,
                     guidance_scale=GUIDANCE, output_type="np",
                     generator=torch.Generator("cpu").manual_seed(i))  # fmt: skip
                seconds[name].append(time.perf_counter() - t)
            request.seed = i
            t = time.perf_counter()
            reply = stub.Generate(request, timeout=3600)
            seconds["sdserve"].append(time.perf_counter() - t)
            timings = {k: round(v, 2) for k, v in (("text", reply.timings.text_encoder_s),
                       ("denoise", reply.timings.denoiser_s),
                       ("vae", reply.timings.vae_decoder_s))}  # fmt: skip
    median = {name: statistics.median(values) for name, values in seconds.items()}
    return {
        "diffusers_float32_s": median["float32"],
        "diffusers_bfloat16_s": median["bfloat16"],
        "sdserve_s": median["sdserve"],
        "sdserve_over_diffusers_float32": median["sdserve"] / median["float32"],
        "sdserve_over_diffusers_bfloat16": median["sdserve"] / median["bfloat16"],
        "sdserve_timings": timings,
        "runs": runs,
    }


def model_for(name: str, tmp: Path) -> tuple[Path, int, int]:
    """(folder, image size, steps) of a model preset."""
    if name == "default":
        return DEFAULT_MODEL_DIR, 64, 25
    return make_tiny_model(tmp / name, seed=0, arch=name), 64, 20


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="default", choices=["default", "tiny-sd15-layout",
                                                               "tiny"])  # fmt: skip
    parser.add_argument("--smoke", action="store_true", help="a few requests per point")
    parser.add_argument("--out", help="JSON report (default bench/results/serving-MODEL.json)")
    parser.add_argument("--plots", help="folder for the pictures (default: beside --out)")
    parser.add_argument("--redis-url", default="", help="job queue for the job point "
                        "(default: a redis-server of its own on a free port)")  # fmt: skip
    parser.add_argument(
        "--sd15-single",
        action="store_true",
        help="only: one request on SD 1.5's full architecture, 512x512 (minutes)",
    )
    parser.add_argument(
        "--sd15-steps",
        type=int,
        default=20,
        help="--sd15-single: DPM-Solver++ steps (default %(default)s)",
    )
    parser.add_argument(
        "--runs",
        type=int,
        default=1,
        help="--sd15-single: requests per system (default %(default)s)",
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    if args.sd15_single:
        return sd15_single(args)
    out = Path(args.out or f"bench/results/serving-{args.model}.json")
    plots = Path(args.plots) if args.plots else out.with_suffix("")
    with tempfile.TemporaryDirectory() as tmp:
        redis = None if args.redis_url else start_redis(Path(tmp) / "redis")
        model, size, steps = model_for(args.model, Path(tmp))
        steps = 4 if args.smoke else steps
        ports = {"grpc_port": free_port(), "http_port": free_port()}
        target = deploy(model, ports, args.redis_url or redis.url, args.smoke)
        try:
            bench = Bench(model, size, steps, target, args.smoke)
            extra = measure(bench, args)
        finally:
            stop_ray()
            if redis is not None:
                redis.stop()
    return report(bench, extra, args, out, plots, size, steps)


def start_redis(folder: Path):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    from helpers import RedisServer  # a real redis-server on a free port (tests/helpers.py)

    return RedisServer(folder).start()


def report(bench: Bench, extra: dict, args, out: Path, plots: Path, size: int, steps: int) -> int:
    from sdserve.loadtest.plot import plot_report

    plots.mkdir(parents=True, exist_ok=True)
    for name, rep in bench.reports.items():
        plot_report(rep, plots / f"{name}.png", title=f"{args.model}, {name}: "
                    + _title(rep.summary()))  # fmt: skip
    found = ratios(bench.results)
    print()
    for name, value in found.items():
        print(f"{name:<44} {value:.2f}")
    print(f"job / Generate latency                       {extra['jobs']['job_over_generate']:.2f}")
    setup = {"model": args.model, "size": size, "steps": steps, "mixed_steps": MIXED_STEPS,
             "scheduler": SCHEDULER, "guidance": GUIDANCE, "cpus": os.cpu_count(),
             "torch": torch.__version__, "smoke": args.smoke}  # fmt: skip
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"setup": setup, "results": bench.results, "ratios": found,
                               **extra}, indent=2))  # fmt: skip
    print(f"\nwrote {out} and the pictures in {plots}/")
    return 0


def _title(summary: dict) -> str:
    return (f"{summary['images_per_s']:.2f} img/s, p50 {summary['p50_s']:.2f}s, "
            f"p99 {summary['p99_s']:.2f}s")  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())
