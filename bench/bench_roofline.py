"""How much of the machine's arithmetic the U-Net uses: achieved FLOP/s against the measured peak.

    .venv/bin/python bench/bench_roofline.py [--models default,tiny-sd15-layout,sd15]
                                             [--out bench/results/roofline.json] [--smoke]

In one run, on this machine:

  1. the dense-matmul peak (a 2048x2048 bf16/fp32 matmul, the best of several) per dtype and
     torch thread count: the roofline's ceiling;
  2. for each model, the U-Net's FLOPs per batch row at its native size, counted with
     `torch.utils.flop_counter`;
  3. achieved U-Net FLOP/s for one request (2 rows: a guided image) and for 16 clients (32
     rows: 16 guided images in one forward):
       - sdserve's Denoiser in its default configuration (`dtype: auto`, `engine.compile`,
         `torch_threads: auto`), through its engine (`DenoiseEngine`): a step's time includes
         the forward, guidance and each sample's scheduler update, as served;
       - sdserve with `dtype: float32` (otherwise default);
       - diffusers' own U-Net forward (what its pipeline calls each step) in float32 (its
         default) and in bfloat16 (`torch_dtype=torch.bfloat16`), on every core;
     and each as a share of the peak of its dtype on every core.

Models: `default` (the built-in model, 64x64), `tiny-sd15-layout` (SD 1.5's block structure at
a narrow width, random weights) and `sd15` (SD 1.5's full architecture, random weights, 512x512;
about 20 minutes on 2 CPU cores). It needs no Ray or Redis. `--smoke` runs the tiny model
briefly, eager, to check the script.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

from sdserve.config import SdserveConfig
from sdserve.constants import DEFAULT_MODEL_DIR
from sdserve.metrics import StatsLogger
from sdserve.pipeline import precision
from sdserve.pipeline.denoise import Denoiser
from sdserve.pipeline.engine import DenoiseEngine
from sdserve.pipeline.models import SD15_SCHEDULER, load_scheduler_config, load_unet
from sdserve.pipeline.threads import available_cores, measure_plan, set_threads
from sdserve.stages.compiling import compile_unet
from sdserve.testing.architectures import random_parts

MODELS = {"default": 64, "tiny-sd15-layout": 64, "sd15": 512, "tiny": 64}
"""Model preset -> image size."""


def matmul_peak(dtype: torch.dtype, threads: int, device: str = "cpu", n: int = 2048,
                repeats: int = 5) -> float:  # fmt: skip
    """FLOP/s of the best of `repeats` n x n matmuls in `dtype` on `threads` torch threads."""
    set_threads(threads)
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    best = float("inf")
    for _ in range(repeats + 2):  # two warm-ups
        _sync(device)
        t = time.perf_counter()
        a @ b
        _sync(device)
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best


def _sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def cpu_name() -> str:
    """The CPU's model name and its matrix extensions, as /proc/cpuinfo says."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or "unknown"
    name = next((ln.split(":", 1)[1].strip() for ln in info.splitlines()
                 if ln.startswith("model name")), "unknown")  # fmt: skip
    words = set(info.split())
    flags = [f for f in ("avx512f", "avx512_bf16", "amx_tile", "amx_bf16") if f in words]
    return f"{name} ({', '.join(flags) or 'no AVX-512'})"


def unet_flops_per_row(unet, size: int, scale: int = 8) -> float:
    """FLOPs of one U-Net forward per batch row at `size` pixels (`scale` pixels per latent)."""
    from torch.utils.flop_counter import FlopCounterMode

    h = size // scale
    x = torch.randn(2, unet.config.in_channels, h, h).to(unet.dtype)
    ctx = torch.randn(2, 77, unet.config.cross_attention_dim).to(unet.dtype)
    counter = FlopCounterMode(display=False)
    with counter, torch.inference_mode(), math_attention(unet):
        unet(x, torch.tensor([500.0, 500.0]), encoder_hidden_states=ctx)
    return counter.get_total_flops() / 2


@contextlib.contextmanager
def math_attention(unet):
    """The U-Net with diffusers' plain attention (bmm, softmax, bmm) instead of
    scaled_dot_product_attention: the same FLOPs, but torch's flop counter has no formula for
    SDPA's CPU kernel and would leave attention out (SD 1.5: 677 GFLOP per row instead of
    803)."""
    from diffusers.models.attention_processor import AttnProcessor

    processors = unet.attn_processors
    unet.set_attn_processor(AttnProcessor())
    try:
        yield unet
    finally:
        unet.set_attn_processor(processors)


def load(model: str) -> tuple[torch.nn.Module, dict, int]:
    """(float32 U-Net, scheduler config, pixels per latent) of a model preset."""
    if model == "default":
        unet = load_unet(DEFAULT_MODEL_DIR, torch.device("cpu"), torch.float32)
        return unet, load_scheduler_config(DEFAULT_MODEL_DIR), 4
    return random_parts(model)["unet"], dict(SD15_SCHEDULER), 8


def diffusers_forward(unet, size: int, scale: int, rows: int, repeats: int) -> float:
    """Seconds of the best of `repeats` forwards of diffusers' U-Net (as its pipeline calls it,
    every core), after a warm-up."""
    set_threads(available_cores())
    h = size // scale
    x = torch.randn(rows, 4, h, h).to(unet.dtype)
    ctx = torch.randn(rows, 77, unet.config.cross_attention_dim).to(unet.dtype)
    t = torch.full((rows,), 500.0)
    best = float("inf")
    with torch.inference_mode():
        for i in range(repeats + 1):
            started = time.perf_counter()
            unet(x, t, encoder_hidden_states=ctx)
            if i:
                best = min(best, time.perf_counter() - started)
    return best


def sdserve_steps(denoiser: Denoiser, threads, size: int, images: int, steps: int) -> float:
    """Seconds per U-Net step of the engine running `images` guided requests together (the
    best step after the first), as the Denoiser service runs them."""
    durations: list[float] = []
    engine = DenoiseEngine(denoiser.unet, max_batch_size=max(16, images),
                           on_stats=lambda s: durations.append(s.duration_s),
                           threads_for_rows=threads, forward=denoiser.forward)  # fmt: skip
    hidden = denoiser.unet.config.cross_attention_dim
    cond = torch.randn(1, 77, hidden)
    for i in range(images):
        engine.submit(denoiser.make_job(f"r{i}", cond, cond, width=size, height=size,
                                        steps=steps, guidance_scale=7.5, scheduler="ddim",
                                        seeds=[i]))  # fmt: skip
    while engine.step() is not None or engine.counts() != (0, 0):
        pass
    return min(durations[1:] or durations)


def sdserve_denoiser(unet, scheduler: dict, scale: int, dtype: str, compile_mode: str):
    """A Denoiser as the service builds it from `dtype` and `engine.compile` (threads measured
    as `torch_threads: auto` does); returns (denoiser, threads_for_rows, resolved dtype)."""
    resolved = precision.resolve_dtype(dtype, torch.device("cpu"))
    part = copy.deepcopy(unet).to(resolved)
    denoiser = Denoiser.from_parts(part, scheduler, scale)
    config = SdserveConfig.model_validate({"engine": {"compile": compile_mode}})
    plan = measure_plan(denoiser.calibration_forward, 2, 32)
    plan = compile_unet(denoiser, config.engine, StatsLogger(), plan, "bench")
    mode = denoiser.forward.mode if denoiser.forward is not None else "off"
    return denoiser, plan.threads_for, precision.dtype_name(resolved), mode


def measure_model(model: str, peaks: dict, smoke: bool) -> list[dict]:
    size = MODELS[model]
    unet, scheduler, scale = load(model)
    flops = unet_flops_per_row(unet, size, scale)
    print(f"{model}: {flops / 1e9:.2f} GFLOP per U-Net row at {size}x{size}", flush=True)
    cores = available_cores()
    big = model == "sd15"
    repeats, steps = (1, 2) if big or smoke else (5, 6)
    rows_out = []

    def record(system: str, dtype: str, rows: int, seconds: float, compiled="off") -> None:
        flop_s = rows * flops / seconds
        peak = peaks[dtype][cores]
        rows_out.append({"model": model, "system": system, "dtype": dtype, "rows": rows,
                         "compile": compiled, "gflop_per_row": flops / 1e9,
                         "forward_s": seconds, "gflop_s": flop_s / 1e9,
                         "of_peak": flop_s / peak})  # fmt: skip
        print(f"  {system:<22} {dtype:<9} {compiled:<8} {rows:>2} rows: "
              f"{seconds * 1000:9.1f} ms/step, {flop_s / 1e9:7.1f} GFLOP/s, "
              f"{flop_s / peak:6.1%} of the {dtype} peak",
              flush=True)  # fmt: skip

    compile_mode = "off" if smoke else "auto"
    for label, dtype in (("sdserve default", "auto"), ("sdserve float32", "float32")):
        denoiser, threads, resolved, mode = sdserve_denoiser(unet, scheduler, scale, dtype,
                                                             compile_mode)  # fmt: skip
        for images in (1, 16):
            if big and resolved == "float32" and images == 16:
                continue  # 3 minutes a step; diffusers' float32 row below stands for it
            seconds = sdserve_steps(denoiser, threads, size, images, steps)
            record(label, resolved, 2 * images, seconds, mode)
        del denoiser
    for dtype in ("float32", "bfloat16"):
        part = unet.to(getattr(torch, dtype))
        for rows in (2, 32):
            record(f"diffusers {dtype}", dtype, rows,
                   diffusers_forward(part, size, scale, rows, repeats))  # fmt: skip
    return rows_out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--models",
        default="default,tiny-sd15-layout,sd15",
        help="comma-separated: default, tiny-sd15-layout, sd15, tiny",
    )
    parser.add_argument("--out", default="bench/results/roofline.json")
    parser.add_argument("--smoke", action="store_true", help="the tiny model, eager, briefly")
    args = parser.parse_args()
    models = ["tiny"] if args.smoke else args.models.split(",")
    cores = available_cores()
    print(f"{cpu_name()}, {cores} cores, torch {torch.__version__}", flush=True)
    peaks: dict[str, dict[int, float]] = {}
    for dtype in ("float32", "bfloat16"):
        # (--smoke: 512 x 512, since a CPU without bf16 matmuls in hardware takes a minute
        # for one 2048 x 2048 bfloat16 matmul)
        n = 512 if args.smoke else 2048
        peaks[dtype] = {t: matmul_peak(getattr(torch, dtype), t, n=n)
                        for t in range(1, cores + 1)}  # fmt: skip
        print(f"matmul peak {dtype:<9}: " + ", ".join(
            f"{v / 1e9:.0f} GFLOP/s on {t} thread(s)" for t, v in peaks[dtype].items()),
            flush=True)  # fmt: skip
    rows = [row for model in models for row in measure_model(model, peaks, args.smoke)]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    setup = {"cpu": cpu_name(), "cores": cores, "torch": torch.__version__,
             "bf16_matmul": precision.cpu_has_bf16_matmul(), "smoke": args.smoke,
             "os_cpus": os.cpu_count()}  # fmt: skip
    out.write_text(json.dumps({"setup": setup, "peaks": peaks, "rows": rows}, indent=2))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
