"""Step-level batching against request-level batching and plain diffusers, side by side.

    .venv/bin/python bench/bench_batching.py [--arch tiny-sd15-layout|tiny] [--quick]
                                             [--out FILE.json]

In one run, on one machine, with a random-weight model sized so that one diffusers request of
20 steps takes 0.3-1 s on 2 CPU cores, it measures:

  ceiling  the compute-only gain of batching: 16 requests through the in-process engine
           (per-request schedulers, per-sample timesteps, one U-Net forward per step) against
           16 sequential diffusers calls. No Ray, no gRPC.
  (a)      diffusers' StableDiffusionPipeline serving requests one at a time, in-process;
  (b)      sdserve over gRPC with request-level batching (engine.batching=request);
  (c)      sdserve over gRPC with step-level batching (engine.batching=step);

each at closed-loop concurrency 1, 4 and 16, open-loop Poisson arrivals at 70% of (b)'s peak
images/s, and a mixed closed loop at concurrency 16 ("mix16") where every other request is
image-to-image (strength 0.75 of an init image: 15 of the 20 steps, from a later timestep;
diffusers serves those with StableDiffusionImg2ImgPipeline on the same weights). It prints
ratios (the machine is shared and noisy; absolute times are not the claim) and writes every
number to JSON.

Models (`--arch`): `tiny-sd15-layout` (default) has SD 1.5's U-Net block structure at a narrow
width, 64x64 images: per-forward overhead dominates, as it does on a GPU at SD sizes, and
batching 16 gains about 4.5x. `tiny` is the 2-level test model at 128x128, where a CPU step's
cost grows almost linearly with the batch and batching gains about 1.5x.
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

from sdserve.config import SdserveConfig
from sdserve.loadtest import Mix, Report, drive, run_loadtest
from sdserve.pipeline.denoise import Denoiser
from sdserve.pipeline.engine import DenoiseEngine
from sdserve.pipeline.text import TextEncoder
from sdserve.pipeline.vae import VaeDecoder
from sdserve.testing.tiny import make_tiny_model

ARCH_SIZES = {"tiny": 128, "tiny-sd15-layout": 64}
"""Image size per model preset, each chosen so one diffusers request of 20 steps takes 0.3-1 s
on 2 CPU cores (0.34 s and 0.53 s measured)."""
SIZE, STEPS, SCHEDULER, GUIDANCE = 128, 20, "ddim", 7.5
PROMPTS = tuple(f"a {c} {s} on a {b} background" for c, s, b in [
    ("red", "circle", "blue"), ("green", "square", "white"), ("yellow", "triangle", "black"),
    ("purple", "circle", "orange"),
])  # fmt: skip
MIX = Mix(prompts=PROMPTS, steps=(STEPS,), schedulers=(SCHEDULER,), widths=(SIZE,),
          heights=(SIZE,), guidances=(GUIDANCE,))  # fmt: skip


def diffusers_pipe(model: Path):
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(model, local_files_only=True)
    pipe.scheduler = DDIMScheduler.from_config(
        json.loads((model / "scheduler" / "scheduler_config.json").read_text())
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def init_png(size: int) -> bytes:
    """The image-to-image requests' init image: one of the default model's synthetic shapes."""
    import io
    import random

    from sdserve.shapes.synthetic import Caption, render

    buf = io.BytesIO()
    render(Caption("red", "circle", "blue"), random.Random(0), size).save(buf, format="PNG")
    return buf.getvalue()


def mixed(mix: Mix) -> Mix:
    """Every other request image-to-image at strength 0.75."""
    return dataclasses.replace(mix, init_image=init_png(SIZE), strengths=(0.75,), image_every=2)


_IMG2IMG: dict[int, object] = {}


def diffusers_call(pipe, request) -> int:
    common = dict(
        num_inference_steps=request.steps,
        guidance_scale=request.guidance_scale,
        generator=torch.Generator("cpu").manual_seed(request.seed),
        output_type="np",
    )
    if request.init_image:
        from diffusers import StableDiffusionImg2ImgPipeline

        from sdserve.pipeline.images import open_rgb

        if id(pipe) not in _IMG2IMG:  # the same weights and scheduler
            _IMG2IMG[id(pipe)] = StableDiffusionImg2ImgPipeline(**pipe.components)
        _IMG2IMG[id(pipe)](request.prompt, image=open_rgb(request.init_image),
                           strength=request.strength, **common)  # fmt: skip
    else:
        pipe(request.prompt, width=request.width, height=request.height, **common)
    return 1


def measure_ceiling(model: Path, pipe, n: int = 16, repeats: int = 3) -> dict:
    """16 sequential diffusers calls vs the same 16 requests batched by the engine in-process."""
    text, denoiser, vae = TextEncoder(model), Denoiser(model), VaeDecoder(model)
    requests = [MIX.request(i) for i in range(n)]

    def sequential():
        for r in requests:
            diffusers_call(pipe, r)

    def batched():
        engine = DenoiseEngine(denoiser.unet, max_batch_size=n)
        jobs = []
        for r in requests:
            emb = text.encode(r.prompt, "", with_uncond=True)
            job = denoiser.make_job(str(r.seed), emb.cond, emb.uncond, width=SIZE, height=SIZE,
                                    steps=STEPS, guidance_scale=GUIDANCE, scheduler=SCHEDULER,
                                    seeds=[r.seed])  # fmt: skip
            engine.submit(job)
            jobs.append(job)
        while engine.counts() != (0, 0):
            engine.step()
        for job in jobs:  # decode one request at a time, as diffusers does
            vae.decode(torch.cat([s.latents for s in job.samples]))

    seq, bat = [], []
    for _ in range(repeats):  # interleaved, so drift on a shared machine hits both
        t = time.perf_counter()
        sequential()
        seq.append(time.perf_counter() - t)
        t = time.perf_counter()
        batched()
        bat.append(time.perf_counter() - t)
    ratios = [s / b for s, b in zip(seq, bat, strict=True)]
    return {"sequential_s": seq, "batched_s": bat, "ratios": ratios,
            "ceiling": statistics.median(ratios)}  # fmt: skip


async def diffusers_load(torch_thread, pipe, mix: Mix | None = None, **load) -> Report:
    """(a): one worker runs diffusers calls one at a time; the clients queue for it."""
    loop = asyncio.get_running_loop()

    async def send(request) -> int:
        return await loop.run_in_executor(torch_thread, diffusers_call, pipe, request)

    return await drive(send, mix=mix or MIX, **load)


def loads(size: str) -> list[tuple[str, dict]]:
    if size == "smoke":
        return [("c1", dict(concurrency=1, requests=1)), ("c4", dict(concurrency=4, requests=4)),
                ("c16", dict(concurrency=16, requests=16)),
                ("mix16", dict(concurrency=16, requests=16, mix=mixed(MIX)))]  # fmt: skip
    scale = 1 if size == "quick" else 2
    return [
        ("c1", dict(concurrency=1, requests=4 * scale)),
        ("c4", dict(concurrency=4, requests=8 * scale)),
        ("c16", dict(concurrency=16, requests=16 * scale + 16)),
        ("mix16", dict(concurrency=16, requests=16 * scale + 16, mix=mixed(MIX))),
    ]


def run_loads(name: str, run_one, points: list[tuple[str, dict]]) -> dict:
    results = {}
    for label, load in points:
        r = results[label] = run_one(**load).summary()
        kinds = ", ".join(f"{k} {v['images_per_s']:.2f}" for k, v in r["by_kind"].items())
        print(f"  {name} {label:>6}: {r['images_per_s']:.2f} img/s ({kinds}), "
              f"p50 {r['p50_s']:.3f}s, p99 {r['p99_s']:.3f}s", flush=True)  # fmt: skip
    return results


def open_load(rate: float, size: str) -> list[tuple[str, dict]]:
    requests = {"smoke": 4, "quick": 30}.get(size, 120)
    return [("open70", dict(rate=rate, requests=requests, duration_s=300))]


def sdserve_config(model: Path, batching: str, grpc_port: int, http_port: int) -> SdserveConfig:
    # eager: this bench measures batching strategies, not compilation (bench_serving.py and
    # bench_roofline.py measure the default, compiled U-Net)
    return SdserveConfig.model_validate({
        "model": {"path": str(model)},
        "engine": {"batching": batching, "max_batch_size": 16, "compile": "off"},
        "server": {"grpc_port": grpc_port, "http_port": http_port},
        # the Denoiser holds the cores; the other stages ride along (num_cpus 0)
        "stages": {"denoiser": {"num_cpus": float(os.cpu_count() or 1)}},
    })  # fmt: skip


def free_port() -> int:
    from sdserve.testing.ports import free_port

    return free_port()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", help="JSON report (default bench/results/batching-ARCH.json)")
    parser.add_argument("--quick", action="store_true", help="fewer requests per load point")
    parser.add_argument("--smoke", action="store_true",
                        help="a few requests per point, 4 steps at 64x64: checks that the "
                        "script runs")  # fmt: skip
    parser.add_argument(
        "--arch", default="tiny-sd15-layout", choices=sorted(ARCH_SIZES),
        help="tiny: 2-level U-Net at 128x128 (batching gains ~1.5x on a CPU); tiny-sd15-layout: "
        "SD 1.5's 4-level U-Net, narrow, at 64x64 (per-forward overhead dominates, as on GPUs)",
    )  # fmt: skip
    args = parser.parse_args()
    global SIZE, STEPS, MIX
    SIZE = ARCH_SIZES[args.arch]
    if args.smoke:  # the script's paths, not its numbers: the least work that takes them all
        SIZE, STEPS = 64, 4
    MIX = Mix(prompts=PROMPTS, steps=(STEPS,), schedulers=(SCHEDULER,), widths=(SIZE,),
              heights=(SIZE,), guidances=(GUIDANCE,))  # fmt: skip
    logging.basicConfig(level=logging.WARNING)
    size = "smoke" if args.smoke else "quick" if args.quick else "full"

    # Every in-process torch call runs on this one thread (see deployments/_common.py).
    torch_thread = ThreadPoolExecutor(max_workers=1)

    def on_torch(fn, *args):
        return torch_thread.submit(fn, *args).result()

    with tempfile.TemporaryDirectory() as tmp:
        model = make_tiny_model(Path(tmp) / "model", seed=0, arch=args.arch)
        on_torch(torch.set_num_threads, os.cpu_count() or 1)
        pipe = on_torch(diffusers_pipe, model)
        for i in range(2):  # warm-up
            on_torch(diffusers_call, pipe, MIX.request(i))
        t = time.perf_counter()
        for i in range(3):
            on_torch(diffusers_call, pipe, MIX.request(i))
        one = (time.perf_counter() - t) / 3
        print(f"one diffusers request ({SIZE}x{SIZE}, {STEPS} steps): {one:.3f}s", flush=True)

        print("ceiling (in-process, compute only) ...", flush=True)
        ceiling = on_torch(measure_ceiling, model, pipe, *((4, 1) if args.smoke else ()))
        runs = ", ".join(f"{r:.2f}" for r in ceiling["ratios"])
        print(f"  16 sequential diffusers / 16 engine-batched: {ceiling['ceiling']:.2f}x "
              f"(runs: {runs})", flush=True)  # fmt: skip

        import ray
        from ray import serve

        from sdserve.serve import server as sdserve_server

        def run_diffusers(**load):
            return asyncio.run(diffusers_load(torch_thread, pipe, **load))

        results: dict[str, dict] = {}
        print("(a) diffusers, in-process, one request at a time ...", flush=True)
        results["a"] = run_loads("a", run_diffusers, loads(size))
        open_rate = None
        grpc_port, http_port = free_port(), free_port()
        target = f"127.0.0.1:{grpc_port}"
        try:  # one Ray instance and Serve's proxies for (b) and (c), each its own application
            for name, batching in (("b", "request"), ("c", "step")):
                config = sdserve_config(model, batching, grpc_port, http_port)
                sdserve_server.start_ray(config)  # the first time only
                sdserve_server.deploy(config)
                sdserve_server.wait_healthy(target)

                def run_sdserve(mix=None, **load):
                    return asyncio.run(run_loadtest(target, mix=mix or MIX, **load))

                run_sdserve(concurrency=2, requests=4)  # warm-up
                print(f"({name}) sdserve, {batching}-level batching ...", flush=True)
                results[name] = run_loads(name, run_sdserve, loads(size))
                if name == "b":
                    open_rate = 0.7 * max(r["images_per_s"] for r in results["b"].values())
                results[name].update(run_loads(name, run_sdserve, open_load(open_rate, size)))
                serve.delete(config.server.app_name)  # (c) starts with none of (b)'s replicas
        finally:
            ray.shutdown()  # and sdserve in it: Serve's graceful stop buys a bench nothing
        print(f"(a) open loop at {open_rate:.2f} requests/s ...", flush=True)
        results["a"].update(run_loads("a", run_diffusers, open_load(open_rate, size)))
        torch_thread.shutdown()

    a, b, c = results["a"], results["b"], results["c"]
    ratios = {
        "c/a images/s at concurrency 16": c["c16"]["images_per_s"] / a["c16"]["images_per_s"],
        "(c/a) / ceiling": (c["c16"]["images_per_s"] / a["c16"]["images_per_s"])
        / ceiling["ceiling"],
        "c/b images/s at concurrency 16": c["c16"]["images_per_s"] / b["c16"]["images_per_s"],
        "c/b p99 latency at 70% load": c["open70"]["p99_s"] / b["open70"]["p99_s"],
        "c/a p50 latency at concurrency 1": c["c1"]["p50_s"] / a["c1"]["p50_s"],
        "c/a images/s, half image-to-image, c16": c["mix16"]["images_per_s"]
        / a["mix16"]["images_per_s"],
        "c/b images/s, half image-to-image, c16": c["mix16"]["images_per_s"]
        / b["mix16"]["images_per_s"],
    }
    print()
    print(f"{'load':<8}" + "".join(f"{s + ' img/s':>12}{s + ' p50':>10}{s + ' p99':>10}"
                                   for s in ("a", "b", "c")))  # fmt: skip
    for label in ("c1", "c4", "c16", "mix16", "open70"):
        row = f"{label:<8}"
        for system in (a, b, c):
            r = system[label]
            row += f"{r['images_per_s']:>12.2f}{r['p50_s']:>10.3f}{r['p99_s']:>10.3f}"
        print(row)
    print(f"\nceiling (compute only): {ceiling['ceiling']:.2f}x")
    for name, value in ratios.items():
        print(f"{name:<36} {value:.2f}")
    out = Path(args.out or f"bench/results/batching-{args.arch}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    setup = {"arch": args.arch, "size": SIZE, "steps": STEPS, "scheduler": SCHEDULER,
             "guidance": GUIDANCE, "one_diffusers_request_s": one, "cpus": os.cpu_count(),
             "torch": torch.__version__}  # fmt: skip
    report = {"setup": setup, "ceiling": ceiling, "results": results, "ratios": ratios}
    out.write_text(json.dumps(report, indent=2))
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
