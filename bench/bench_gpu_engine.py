"""sdserve's request path and engine against diffusers' pipeline on a GPU, without Ray.

    python bench/bench_gpu_engine.py [--out bench/results/gpu_engine.json]
    python bench/bench_gpu_engine.py --arch sdxl --out bench/results/gpu_engine_sdxl.json
    python bench/bench_gpu_engine.py --dtype bf16 --compile off   # other precision, eager
    python bench/bench_gpu_engine.py --smoke     # tiny model, CPU, seconds: checks the script

SD 1.5's architecture (sdserve.testing.architectures: `sd15`) with random weights, fp16 (or
`--dtype bf16`), 512x512, 25 DDIM steps, guidance 7.5, the U-Net compiled as sdserve's default
does on CUDA (`--compile auto`: max-autotune, rows padded to buckets; or off, default); with
`--arch sdxl`, SDXL base's (`sdxl`: two text encoders, the 2.6 B U-Net with per-row pooled and
size conditioning, the VAE decoding in fp32 as diffusers' SDXL pipeline does) at 1024x1024,
against `StableDiffusionXLPipeline`.
sdserve runs through the code that serves requests:
`StagePath` over the `InProcessStageClient`, i.e. the TextEncoder, Denoiser (its step-level
batching engine) and VaeDecoder services on one torch thread; only Serve's hops are missing.
In one run it measures:

  - batch B in 1, 4, 8, 16: B requests submitted at once (engine.max_batch_size = B), against
    diffusers' StableDiffusionPipeline called with B prompts; images/s of both, and the U-Net's
    achieved TFLOP/s inside sdserve's engine (FLOPs of one forward counted by torch's
    FlopCounterMode);
  - a closed loop of 32 clients (engine.max_batch_size 16, the default), images/s and
    p50/p99 latency, against diffusers at batch 1 one request at a time;
  - the card's dense matmul peak in the run's dtype (8192^2, measured), and each batch's U-Net
    TFLOP/s as a share of it.

It needs torch, transformers, diffusers, pydantic, protobuf and grpcio; not Ray or Redis (the
device machine has neither: carry diffusers and pydantic as wheels, see the device README).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path

import torch

from sdserve.api.proto import fields_from_pb
from sdserve.api.types import Result
from sdserve.config import SdserveConfig
from sdserve.loadtest import Mix, drive
from sdserve.metrics import StatsLogger
from sdserve.orchestration.in_process import InProcessStageClient
from sdserve.orchestration.path import StagePath
from sdserve.pipeline.compiled import DEFAULT_BUCKETS, resolve_mode
from sdserve.pipeline.denoise import Denoiser
from sdserve.pipeline.images import VaeEncoder
from sdserve.pipeline.models import (
    SD15_SCHEDULER,
    SDXL_SCHEDULER,
    sd_pipeline,
    sdxl_pipeline,
    vae_scale_factor,
)
from sdserve.pipeline.text import TextEncoder
from sdserve.pipeline.text_time import pooled_width, takes_text_time, time_ids
from sdserve.pipeline.vae import VaeDecoder
from sdserve.stages.denoiser import DenoiserService
from sdserve.stages.runtime import TorchThread
from sdserve.stages.text_encoder import TextEncoderService
from sdserve.stages.vae_decoder import VaeDecoderService
from sdserve.stages.vae_encoder import VaeEncoderService
from sdserve.testing.architectures import random_parts
from sdserve.v1 import diffusion_pb2

GUIDANCE = 7.5
ARCHS = {  # --arch: (preset, size, steps) on the GPU; (preset, size, steps) with --smoke
    "sd15": (("sd15", 512, 25), ("tiny", 64, 4)),
    "sdxl": (("sdxl", 1024, 25), ("tiny-sdxl", 64, 4)),
}


class Bench:
    """One model on one device, served two ways: sdserve's path and diffusers' pipeline."""

    def __init__(self, arch: str, size: int, steps: int, device: torch.device, dtype):
        from diffusers import DDIMScheduler

        self.size, self.steps, self.device = size, steps, device
        parts = random_parts(arch)
        for name, part in parts.items():
            if not name.startswith("tokenizer"):
                part.to(device, dtype)
        xl = "text_encoder_2" in parts
        schedule = SDXL_SCHEDULER if xl else SD15_SCHEDULER
        if xl:
            self.pipe = sdxl_pipeline(parts)
        else:
            self.pipe = sd_pipeline(parts["vae"], parts["text_encoder"], parts["tokenizer"],
                                    parts["unet"])  # fmt: skip
        self.pipe.scheduler = DDIMScheduler.from_config(schedule)
        self.pipe.set_progress_bar_config(disable=True)
        self.thread = TorchThread("bench-torch")
        self.stats = StatsLogger()
        second = {"tokenizer_2": parts.get("tokenizer_2"), "model_2": parts.get("text_encoder_2")}
        text = TextEncoder.from_parts(parts["tokenizer"], parts["text_encoder"], **second)
        self.text = TextEncoderService(text, self.thread)
        self.denoiser = Denoiser.from_parts(
            parts["unet"], schedule, vae_scale_factor(dict(parts["vae"].config))
        )
        self.vae = VaeDecoderService(VaeDecoder.from_parts(parts["vae"], upcast=xl), self.thread)
        self.vae_encoder = VaeEncoderService(VaeEncoder.from_parts(parts["vae"]), self.thread)

    def path(self, max_batch_size: int) -> tuple[StagePath, DenoiserService]:
        """sdserve's request path with an engine of this batch size (the parts are shared)."""
        config = SdserveConfig.model_validate({
            "engine": {"max_batch_size": max_batch_size},
            "defaults": {"steps": self.steps, "scheduler": "ddim", "guidance_scale": GUIDANCE},
        })  # fmt: skip
        service = DenoiserService(self.denoiser, config.engine, self.stats, self.thread)
        client = InProcessStageClient(self.text, service, self.vae, self.vae_encoder)
        return StagePath(client, config), service

    def request(self, i: int) -> diffusion_pb2.GenerateRequest:
        return diffusion_pb2.GenerateRequest(prompt=f"a photo of object {i}", seed=i,
                                             width=self.size, height=self.size)  # fmt: skip

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    def diffusers(self, batch: int) -> float:
        """Seconds for one pipeline call with `batch` prompts."""
        prompts = [self.request(i).prompt for i in range(batch)]
        generators = [torch.Generator("cpu").manual_seed(i) for i in range(batch)]
        self.sync()
        t = time.perf_counter()
        self.pipe(prompts, num_inference_steps=self.steps, guidance_scale=GUIDANCE,
                  height=self.size, width=self.size, generator=generators,
                  output_type="np")  # fmt: skip
        self.sync()
        return time.perf_counter() - t

    async def sdserve(self, path: StagePath, batch: int) -> tuple[float, float]:
        """(wall seconds, seconds inside U-Net steps) for `batch` requests submitted at once."""
        unet_before = self.stats.denoiser.unet_seconds

        async def one(i: int) -> None:
            params = await path.validate(fields_from_pb(self.request(i)))
            async for _ in path.run(params):
                pass

        t = time.perf_counter()
        await asyncio.gather(*(one(i) for i in range(batch)))
        self.sync()
        return time.perf_counter() - t, self.stats.denoiser.unet_seconds - unet_before

    async def closed_loop(self, path: StagePath, clients: int, requests: int) -> dict:
        async def send(request: diffusion_pb2.GenerateRequest) -> int:
            params = await path.validate(fields_from_pb(request))
            async for event in path.run(params):
                if isinstance(event, Result):
                    return len(event.pngs)
            return 0

        mix = Mix(prompts=("a photo of an object",), steps=(self.steps,), schedulers=("ddim",),
                  widths=(self.size,), heights=(self.size,), guidances=(GUIDANCE,))  # fmt: skip
        report = await drive(send, mix=mix, concurrency=clients, requests=requests)
        return report.summary()

    def unet_flops_per_row(self) -> float:
        """FLOPs of one U-Net forward per batch row (a CFG step at batch 1 is two rows)."""
        from bench_roofline import math_attention  # attention's FLOPs counted too
        from torch.utils.flop_counter import FlopCounterMode

        unet, h = self.pipe.unet, self.size // self.pipe.vae_scale_factor
        x = torch.randn(2, 4, h, h, device=self.device, dtype=unet.dtype)
        hidden = unet.config.cross_attention_dim
        ctx = torch.randn(2, 77, hidden, device=self.device, dtype=unet.dtype)
        added = None
        if takes_text_time(unet):  # SDXL: the pooled text and size conditioning
            pooled = torch.randn(2, pooled_width(unet), device=self.device, dtype=unet.dtype)
            ids = time_ids(self.size, self.size, dtype=unet.dtype, device=self.device)
            added = {"text_embeds": pooled, "time_ids": ids.repeat(2, 1)}
        counter = FlopCounterMode(display=False)
        with counter, torch.inference_mode(), math_attention(unet):
            unet(x, torch.tensor([500, 500], device=self.device), encoder_hidden_states=ctx,
                 added_cond_kwargs=added)  # fmt: skip
        return counter.get_total_flops() / 2


async def measure(bench: Bench, batches: list[int], clients: int, requests: int,
                  peak: float) -> dict:  # fmt: skip
    flops_row = bench.unet_flops_per_row()
    print(f"U-Net: {2 * flops_row / 1e9:.2f} GFLOP per CFG step at batch 1", flush=True)
    bench.diffusers(1)  # warm-up of both
    warm, service = bench.path(1)
    await bench.sdserve(warm, 1)
    service.close()

    rows = []
    for batch in batches:
        path, service = bench.path(batch)
        d = min(bench.diffusers(batch) for _ in range(2))
        e, unet_s = min([await bench.sdserve(path, batch) for _ in range(2)], key=lambda r: r[0])
        service.close()
        tflops = flops_row * 2 * batch * bench.steps / unet_s / 1e12
        rows.append({"batch": batch, "diffusers_img_s": batch / d, "sdserve_img_s": batch / e,
                     "sdserve_unet_tflops": tflops, "sdserve_unet_share": unet_s / e,
                     "sdserve_unet_of_peak": tflops * 1e12 / peak})  # fmt: skip
        print(
            f"batch {batch:>2}: diffusers {batch / d:7.2f} img/s   sdserve {batch / e:7.2f} "
            f"img/s   U-Net {tflops:7.1f} TFLOP/s ({tflops * 1e12 / peak:.0%} of the peak), "
            f"{unet_s / e:.0%} of the time",
            flush=True,
        )

    path, service = bench.path(16)
    loop = await bench.closed_loop(path, clients, requests)
    service.close()
    one = rows[0]["diffusers_img_s"]
    print(
        f"closed loop, {clients} clients: {loop['images_per_s']:.2f} img/s, p50 "
        f"{loop['p50_s']:.2f}s, p99 {loop['p99_s']:.2f}s; {loop['images_per_s'] / one:.2f}x "
        "diffusers at batch 1",
        flush=True,
    )
    return {"unet_flops_per_row": flops_row, "rows": rows, "closed_loop": loop,
            "closed_loop_over_diffusers_b1": loop["images_per_s"] / one}  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="bench/results/gpu_engine.json")
    parser.add_argument(
        "--arch",
        choices=sorted(ARCHS),
        default="sd15",
        help="sd15: SD 1.5's sizes at 512x512 (default); sdxl: SDXL base's at 1024x1024, "
        "fp16 with the VAE decoding in fp32; 25 DDIM steps either way (with --smoke: the tiny "
        "or tiny-sdxl model at 64x64, 4 steps)",
    )
    parser.add_argument(
        "--dtype",
        choices=["fp16", "bf16"],
        default="fp16",
        help="the parts' dtype on the GPU (default %(default)s)",
    )
    parser.add_argument("--compile", default="auto",
                        choices=["auto", "off", "default", "max-autotune"],
                        help="engine.compile of sdserve's U-Net: auto is sdserve's default on "
                        "CUDA (max-autotune, rows padded to buckets; default %(default)s); the "
                        "smoke run is eager unless told")  # fmt: skip
    parser.add_argument("--smoke", action="store_true", help="tiny model on CPU, a few steps")
    parser.add_argument("--batches", default="1,4,8,16")
    parser.add_argument("--clients", type=int, default=32, help="closed-loop clients")
    parser.add_argument("--requests", type=int, default=96, help="closed-loop requests")
    args = parser.parse_args()
    compile_mode = args.compile
    if args.smoke:
        arch, size, steps = ARCHS[args.arch][1]
        device, dtype = torch.device("cpu"), torch.float32
        batches, clients, requests = [1, 2], 4, 4
        compile_mode = "off" if compile_mode == "auto" else compile_mode
    else:
        if not torch.cuda.is_available():
            print("no CUDA device: run with --smoke to check the script on a CPU", file=sys.stderr)
            return 2
        arch, size, steps = ARCHS[args.arch][0]
        device = torch.device("cuda")
        dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}[args.dtype]
        batches = [int(b) for b in args.batches.split(",")]
        clients, requests = args.clients, args.requests
    card = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    mode = resolve_mode(compile_mode, device)
    print(f"{arch} {size}x{size}, {steps} DDIM steps, {dtype}, compile {mode}, on {card}",
          flush=True)  # fmt: skip
    sys.path.insert(0, str(Path(__file__).resolve().parent))  # the other benchmarks
    from bench_roofline import matmul_peak

    peak = matmul_peak(dtype, torch.get_num_threads(), device.type,
                       n=2048 if args.smoke else 8192)  # fmt: skip
    print(f"dense matmul peak in {dtype}: {peak / 1e12:.1f} TFLOP/s", flush=True)

    bench = Bench(arch, size, steps, device, dtype)
    try:
        if mode != "off":
            seconds = bench.thread.call(bench.denoiser.compile, mode, DEFAULT_BUCKETS, (), None,
                                        None, max(batches) * 2)  # fmt: skip
            print(f"compiled the U-Net ({mode}, buckets {DEFAULT_BUCKETS}) in {seconds:.0f}s")
        result = asyncio.run(measure(bench, batches, clients, requests, peak))
    finally:
        bench.thread.close()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    setup = {"arch": arch, "size": size, "steps": steps, "device": card, "dtype": str(dtype),
             "compile": mode, "matmul_peak_flops": peak, "torch": torch.__version__}  # fmt: skip
    out.write_text(json.dumps({"setup": setup, **result}, indent=2))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
