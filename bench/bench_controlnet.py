"""ControlNet per request: controlled and plain requests in one step batch, against one
ControlNet set per forward and against diffusers' ControlNet pipeline, side by side.

    .venv/bin/python bench/bench_controlnet.py [--model default|tiny-sd15-layout|both]
                                               [--rounds 3] [--requests 48] [--quick]
                                               [--out FILE.json]

Two models (both by default), each with two random ControlNets, A and B
(`testing.controlnets.random_controlnet`: every weight drawn; the control-image encoder has one
stride-2 step per halving of the VAE, widths (16, 32, 96) for the built-in model's 4x):

- `default`, the built-in model (trained weights, 64x64, a 3-level U-Net of 32-128 channels),
  the model of the LoRA and serving benches. On this CPU a forward's time grows with its rows
  at 16 images, so batching buys less than it does on a GPU;
- `tiny-sd15-layout` (random weights, SD 1.5's 4-level U-Net block structure at a narrow width,
  64x64): more layers of less work each, so per-forward overhead weighs more, as it does on a
  GPU at SD sizes. SD 1.5's own size would take minutes per request here.

A closed loop of 16 clients sends the same requests (25 steps of DDIM, guidance 7.5) three
ways, in interleaved rounds; the control sets cycle none, A, none, B, none, A+B, so half the
requests are controlled:

  mixed      sdserve's step engine (`engine.lora_policy: mixed`, its default): one U-Net
             forward holds every running request; each ControlNet runs once per step over the
             rows that use it;
  one_set    the same engine, but a forward holds the requests of one ControlNet set only, the
             sets taking turns (`engine.lora_policy: one_set`: what a server that binds one
             ControlNet, or one MultiControlNet, to a batch does);
  diffusers  `StableDiffusionControlNetPipeline` (a `MultiControlNetModel` for A+B), one
             request at a time; the plain requests through `StableDiffusionPipeline`. Set up as
             a user who tunes it would: the pipelines built once with the same components and
             the same ControlNet weights, progress bar off, and the faster of float32 and
             bfloat16, on every core or one thread, measured here before the rounds.

Both run in-process on one torch thread that does all of the torch work (text encoding, the
steps, decoding), as a Denoiser replica's does; sdserve in its default dtype (`auto`: bfloat16
on a CPU with bf16 matmuls, float32 otherwise), eager (every forward with a ControlNet row runs
eagerly in serving too), on the faster of the torch threads serving's `torch_threads: auto`
measures for its U-Net (`threads.measure_plan`), every core and one thread, measured first as
diffusers' setting is.
sdserve's side submits jobs to the engine directly: serving's hops between stages would cost
mixed and one_set alike. It prints, per model, images/s (median over rounds), the ratios
mixed / diffusers and mixed / one_set, and the U-Net and ControlNet forwards and rows per image
of each way.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from sdserve.constants import DEFAULT_MODEL_DIR
from sdserve.loadtest import Mix, drive
from sdserve.loadtest.drive import SendError
from sdserve.pipeline.controlnet import Control, check_fits, load_controlnet, prepare_image
from sdserve.pipeline.denoise import Denoiser
from sdserve.pipeline.engine import Cancelled, DenoiseEngine, Failed, Finished
from sdserve.pipeline.text import TextEncoder
from sdserve.pipeline.threads import ThreadPlan, available_cores, measure_plan, set_threads
from sdserve.pipeline.vae import VaeDecoder
from sdserve.testing.controlnets import random_controlnet
from sdserve.testing.tiny import make_tiny_model

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_cheap_steps import PROMPTS  # noqa: E402

SIZE, GUIDANCE = 64, 7.5
NETS = ("a", "b")
MODELS = ("default", "tiny-sd15-layout")
CONDITIONING = (16, 32, 96, 256)
"""The control-image encoder's widths (diffusers' default), cut to one stride-2 step per
halving of the VAE: (16, 32, 96) for the built-in model's 4x."""
CONTROL_SETS = ((), ("a",), (), ("b",), (), ("a", "b"))
"""Request i's ControlNets: CONTROL_SETS[i % 6]; half the requests have none."""


def control_set(request) -> tuple[str, ...]:
    return CONTROL_SETS[request.seed % len(CONTROL_SETS)]  # Mix gives request i seed i


def control_images() -> dict[str, Image.Image]:
    """A: a white disc on black (an edge map's kind); B: a left-to-right ramp (a depth map's)."""
    disc = Image.new("RGB", (SIZE, SIZE))
    ImageDraw.Draw(disc).ellipse([SIZE // 5, SIZE // 4, SIZE * 3 // 4, SIZE * 4 // 5], "white")
    ramp = np.tile(np.linspace(0, 255, SIZE, dtype=np.uint8), (SIZE, 1))
    return {"a": disc, "b": Image.fromarray(np.stack([ramp] * 3, axis=-1))}


def write_model(name: str, tmp: Path) -> tuple[Path, Path]:
    """(the model's folder, a folder with its two random ControlNets, one diffusers folder
    each)."""
    model = DEFAULT_MODEL_DIR if name == "default" else make_tiny_model(tmp / name, arch=name)
    denoiser = Denoiser(model, dtype="float32")
    widths = CONDITIONING[: denoiser.vae_scale_factor.bit_length()]
    for i, net in enumerate(NETS):
        random_controlnet(denoiser.unet, 10 + i, widths).save_pretrained(tmp / "nets" / net)
    return model, tmp / "nets"


class Calls:
    """Counts a module's forwards and the batch rows they took."""

    def __init__(self, *modules: torch.nn.Module):
        self.forwards = self.rows = 0
        for module in modules:
            module.register_forward_pre_hook(self._count, with_kwargs=True)

    def _count(self, _module, args, kwargs) -> None:
        self.forwards += 1
        self.rows += (args[0] if args else kwargs["sample"]).shape[0]

    def read(self) -> tuple[int, int]:
        return self.forwards, self.rows


class Sdserve:
    """sdserve's stages and step engine on `torch_thread`; `send` is one request."""

    def __init__(self, model: Path, folder: Path, torch_thread: ThreadPoolExecutor, steps: int):
        self.torch, self.steps = torch_thread, steps
        self.text = TextEncoder(model)
        self.denoiser = Denoiser(model)
        self.vae = VaeDecoder(model)
        unet = self.denoiser.unet
        self.nets = {name: load_controlnet(folder / name, self.denoiser.device, unet.dtype)
                     for name in NETS}  # fmt: skip
        for name, net in self.nets.items():
            check_fits(net, unet, name)
        self.images = {k: prepare_image(v, SIZE, SIZE) for k, v in control_images().items()}
        self.unet_calls, self.net_calls = Calls(unet), Calls(*self.nets.values())
        self.plan = measure_plan(self.denoiser.calibration_forward, 2, 32)  # as serving does
        self.engine = DenoiseEngine(unet, max_batch_size=16, threads_for_rows=self.plan.threads_for)
        self.engine.start(torch_thread)

    async def send(self, request) -> int:
        loop = asyncio.get_running_loop()
        ended: asyncio.Future = loop.create_future()

        def on_event(event) -> None:
            if isinstance(event, Finished | Failed | Cancelled):
                loop.call_soon_threadsafe(ended.set_result, event)

        await loop.run_in_executor(self.torch, self._submit, request, on_event)
        event = await ended
        if not isinstance(event, Finished):
            raise SendError(type(event).__name__.upper())
        await loop.run_in_executor(self.torch, self.vae.decode, event.latents)
        return 1

    def _submit(self, request, on_event) -> None:
        """On the torch thread: the prompt's embeddings, the job, into the engine."""
        emb = self.text.encode(request.prompt, "", with_uncond=True)
        controls = [Control(self.nets[n], self.images[n]) for n in control_set(request)]
        job = self.denoiser.make_job(
            str(request.seed), emb.cond, emb.uncond, width=SIZE, height=SIZE,
            steps=self.steps, guidance_scale=GUIDANCE, scheduler="ddim", seeds=[request.seed],
            controls=controls, on_event=on_event,
        )  # fmt: skip
        self.engine.submit(job)


class Diffusers:
    """diffusers' pipelines on the built-in model in `dtype`, one per control set, built once
    with the same components; `call` runs one request."""

    def __init__(self, model: Path, folder: Path, dtype: torch.dtype, steps: int):
        from diffusers import ControlNetModel, DDIMScheduler, StableDiffusionPipeline
        from diffusers import StableDiffusionControlNetPipeline as ControlNetPipeline
        from diffusers.models.controlnets.multicontrolnet import MultiControlNetModel

        self.steps, self.images = steps, control_images()
        plain = StableDiffusionPipeline.from_pretrained(model, dtype=dtype,
                                                        local_files_only=True)  # fmt: skip
        plain.scheduler = DDIMScheduler.from_config(plain.scheduler.config)
        nets = {n: ControlNetModel.from_pretrained(folder / n, dtype=dtype) for n in NETS}
        self.pipes = {(): plain}
        for names in sorted(set(CONTROL_SETS) - {()}):
            net = nets[names[0]] if len(names) == 1 else MultiControlNetModel(
                [nets[n] for n in names])  # fmt: skip
            self.pipes[names] = ControlNetPipeline(
                **plain.components, controlnet=net, requires_safety_checker=False)  # fmt: skip
        for pipe in self.pipes.values():
            pipe.set_progress_bar_config(disable=True)
        self.unet_calls, self.net_calls = Calls(plain.unet), Calls(*nets.values())

    def call(self, request) -> int:
        names = control_set(request)
        images = [self.images[n] for n in names]
        kwargs = {"image": images[0] if len(images) == 1 else images} if images else {}
        self.pipes[names](
            request.prompt, num_inference_steps=self.steps, guidance_scale=GUIDANCE,
            width=SIZE, height=SIZE, generator=torch.Generator().manual_seed(request.seed),
            output_type="np", **kwargs,
        )  # fmt: skip
        return 1


def tune_diffusers(model: Path, folder: Path, torch_thread, mix: Mix,
                   args) -> tuple[Diffusers, int, dict]:  # fmt: skip
    """The fastest of float32 and bfloat16, on every core and on one thread: seconds per
    request over a cycle of control sets, the configurations interleaved."""
    cores = available_cores()
    pipes = {dtype: torch_thread.submit(Diffusers, model, folder, dtype, args.steps).result()
             for dtype in (torch.float32, torch.bfloat16)}  # fmt: skip
    configs = [(dtype, threads) for dtype in pipes for threads in dict.fromkeys((cores, 1))]
    n = 1 if args.quick else len(CONTROL_SETS)
    seconds: dict[str, list[float]] = {}
    for _ in range(1 if args.quick else 2):  # the first repeat warms each one up
        for dtype, threads in configs:
            started = time.perf_counter()
            torch_thread.submit(set_threads, threads).result()
            for i in range(n):
                torch_thread.submit(pipes[dtype].call, mix.request(i)).result()
            label = f"{str(dtype).removeprefix('torch.')}, {threads} threads"
            seconds.setdefault(label, []).append((time.perf_counter() - started) / n)
    timed = {label: s[-1] for label, s in seconds.items()}
    best = min(range(len(configs)), key=lambda k: list(timed.values())[k])
    dtype, threads = configs[best]
    print("diffusers, seconds per request: " + ", ".join(
        f"{k} {v:.3f}" for k, v in timed.items()) + f"; using {list(timed)[best]}",
        flush=True)  # fmt: skip
    return pipes[dtype], threads, {"seconds_per_request": timed, "chosen": list(timed)[best]}


def tune_sdserve(ours: Sdserve, torch_thread, mix: Mix, args) -> dict:
    """The faster of serving's measured thread plan, every core and one thread for sdserve's
    mixed way (images/s of a short closed loop each, after a warm-up), as diffusers' side is
    tuned; `ours` keeps the winner."""
    cores = available_cores()
    plans = {"serving's plan": ours.plan, f"{cores} threads": ThreadPlan.fixed(cores),
             "1 thread": ThreadPlan.fixed(1)}  # fmt: skip
    requests = min(args.requests, 16)
    rates: dict[str, float] = {}
    for _ in range(1 if args.quick else 2):  # the first repeat warms each one up
        for label, plan in plans.items():
            ours.engine.threads_for_rows = plan.threads_for
            torch_thread.submit(set_threads, plan.small).result()
            one = run_way(ours.send, (ours.unet_calls, ours.net_calls), mix, args.concurrency,
                          requests)  # fmt: skip
            rates[label] = one["images_per_s"]
    best = max(rates, key=rates.get)
    ours.plan = plans[best]
    ours.engine.threads_for_rows = ours.plan.threads_for
    print("sdserve mixed, images/s: " + ", ".join(f"{k} {v:.2f}" for k, v in rates.items())
          + f"; using {best}", flush=True)  # fmt: skip
    return {"images_per_s": rates, "chosen": best}


def run_way(send, calls: tuple[Calls, Calls], mix: Mix, concurrency: int, requests: int) -> dict:
    """One closed loop through `send`; images/s and the forwards and rows per image."""
    before = [c.read() for c in calls]
    summary = asyncio.run(drive(send, mix=mix, concurrency=concurrency,
                                requests=requests)).summary()  # fmt: skip
    assert summary["ok"] == requests, summary
    after = [c.read() for c in calls]
    (unet_f, unet_r), (net_f, net_r) = [(a[0] - b[0], a[1] - b[1]) for a, b in
                                        zip(after, before, strict=True)]  # fmt: skip
    images = summary["images"]
    return {"images_per_s": summary["images_per_s"], "p50_s": summary["p50_s"],
            "images": images, "unet_forwards_per_image": unet_f / images,
            "unet_rows_per_image": unet_r / images, "controlnet_forwards_per_image":
            net_f / images, "controlnet_rows_per_image": net_r / images}  # fmt: skip


def rounds(ours: Sdserve, theirs: Diffusers, threads: int, torch_thread, mix: Mix,
           args) -> dict[str, list[dict]]:  # fmt: skip
    """Interleaved rounds of the three ways."""

    async def call_theirs(request) -> int:
        return await asyncio.get_running_loop().run_in_executor(torch_thread, theirs.call,
                                                                 request)  # fmt: skip

    ways = {"mixed": ("mixed", args.requests), "one_set": ("one_set", args.requests),
            "diffusers": (None, args.diffusers_requests)}  # fmt: skip
    runs: dict[str, list[dict]] = {way: [] for way in ways}
    torch_thread.submit(set_threads, ours.plan.small).result()
    run_way(ours.send, (ours.unet_calls, ours.net_calls), mix, args.concurrency,
            min(args.requests, 12))  # warm-up  # fmt: skip
    for r in range(args.rounds):
        for way, (policy, requests) in ways.items():
            if policy is None:
                torch_thread.submit(set_threads, threads).result()
                one = run_way(call_theirs, (theirs.unet_calls, theirs.net_calls), mix,
                              args.concurrency, requests)  # fmt: skip
            else:
                ours.engine.lora_policy = policy
                torch_thread.submit(set_threads, ours.plan.small).result()
                one = run_way(ours.send, (ours.unet_calls, ours.net_calls), mix,
                              args.concurrency, requests)  # fmt: skip
            runs[way].append(one)
            print(f"  round {r + 1} {way:<9} {one['images_per_s']:6.2f} img/s, "
                  f"{one['unet_forwards_per_image']:.2f} U-Net forwards and "
                  f"{one['controlnet_forwards_per_image']:.2f} ControlNet forwards per image",
                  flush=True)  # fmt: skip
    ours.engine.lora_policy = "mixed"
    return runs


def summarize(runs: dict[str, list[dict]], rounds: int) -> tuple[dict, dict]:
    """Prints a table (images/s median over rounds, the forwards and rows per image) and the
    ratios mixed / diffusers and mixed / one_set; returns (the table, the ratios)."""
    keys = [k for k in runs["mixed"][0] if k.endswith("_per_image")]
    table = {way: {"images_per_s": statistics.median(i["images_per_s"] for i in items),
                   **{k: statistics.mean(i[k] for i in items) for k in keys}}
             for way, items in runs.items()}  # fmt: skip
    mixed = table["mixed"]["images_per_s"]
    ratios = {f"mixed / {way}": mixed / table[way]["images_per_s"]
              for way in ("diffusers", "one_set")}  # fmt: skip
    heads = [k.removesuffix("_per_image").replace("_", " ") for k in keys]
    print(f"\n| way | images/s (median of {rounds}) | " + " | ".join(
        f"{h} per image" for h in heads) + " |")  # fmt: skip
    print("|---|" + "---:|" * (len(keys) + 1))
    for way, row in table.items():
        print(f"| {way} | " + " | ".join(f"{row[k]:.2f}" for k in ["images_per_s", *keys]) + " |")
    print(", ".join(f"{k} {v:.2f}x" for k, v in ratios.items()) + "\n", flush=True)
    return table, ratios


def bench_model(name: str, tmp: Path, torch_thread, mix: Mix, args) -> dict:
    """The three ways on one model, with its two random ControlNets."""
    model, folder = torch_thread.submit(write_model, name, tmp / name).result()
    print(f"{name}: {args.steps} DDIM steps, guidance {GUIDANCE}, {SIZE}x{SIZE}", flush=True)
    theirs, threads, tuning = tune_diffusers(model, folder, torch_thread, mix, args)
    ours = torch_thread.submit(Sdserve, model, folder, torch_thread, args.steps).result()
    try:
        our_tuning = tune_sdserve(ours, torch_thread, mix, args)
        runs = rounds(ours, theirs, threads, torch_thread, mix, args)
    finally:
        ours.engine.stop()
    table, ratios = summarize(runs, args.rounds)
    plan = ours.plan
    sdserve = {"dtype": str(ours.denoiser.unet.dtype), "tuning": our_tuning,
               "threads": {"small": plan.small, "large": plan.large,
                           "threshold_rows": plan.threshold_rows}}  # fmt: skip
    return {"sdserve": sdserve, "diffusers": tuning, "runs": runs, "table": table,
            "ratios": ratios}  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=[*MODELS, "both"], default="both")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--requests", type=int, default=48, help="sdserve's requests per run")
    parser.add_argument(
        "--diffusers-requests",
        type=int,
        default=12,
        help="diffusers' requests per run (one at a time: its rate is steady)",
    )
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument(
        "--quick",
        action="store_true",
        help="seconds: the built-in model, a few requests of 3 steps, 1 round",
    )
    parser.add_argument("--out", help="JSON (default bench/results/controlnet.json)")
    args = parser.parse_args()
    if args.quick:
        args.rounds, args.requests, args.diffusers_requests = 1, 6, 6
        args.concurrency, args.steps, args.model = 6, 3, "default"
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    for library in (diffusers_logging, transformers_logging):
        library.disable_progress_bar()  # loading bars
    mix = Mix(prompts=PROMPTS)
    torch_thread = ThreadPoolExecutor(max_workers=1)  # all torch work, as in a replica
    report = {"args": vars(args), "control_sets": CONTROL_SETS, "cores": available_cores(),
              "cpus": os.cpu_count(), "torch": torch.__version__, "models": {}}  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        for name in MODELS if args.model == "both" else (args.model,):
            report["models"][name] = bench_model(name, Path(tmp), torch_thread, mix, args)
    torch_thread.shutdown()
    out = Path(args.out or "bench/results/controlnet.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
