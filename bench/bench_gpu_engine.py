"""The Denoiser engine against diffusers' pipeline on a GPU, without Ray.

    python bench/bench_gpu_engine.py [--out bench/results/gpu_engine.json]
    python bench/bench_gpu_engine.py --smoke     # tiny model, CPU, seconds: checks the script

SD 1.5's architecture (services/sdserve/pipeline/tiny.py: SD15_*) with random weights, fp16,
512x512, 25 DDIM steps, guidance 7.5. For batch sizes 1, 4, 8 and 16 it measures images/s of
  - diffusers' StableDiffusionPipeline with B prompts in one call;
  - sdserve's engine with B requests (each its own scheduler, generator and timestep row)
    admitted together, plus text encoding and one VAE decode per request,
and the U-Net's achieved TFLOP/s (FLOPs counted by torch's FlopCounterMode on one forward).
It needs torch, transformers and diffusers only.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch


def build(arch: str, device: torch.device, dtype: torch.dtype):
    from diffusers import (
        AutoencoderKL,
        DDIMScheduler,
        StableDiffusionPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from sdserve.pipeline import tiny

    unet_cfg, vae_cfg, text_cfg = {
        "sd15": (tiny.SD15_UNET, tiny.SD15_VAE, tiny.SD15_TEXT_ENCODER),
        "tiny": (tiny.TINY_UNET, tiny.TINY_VAE, {**tiny.TINY_TEXT_ENCODER, "vocab_size": 514}),
    }[arch]
    vocab = tiny._byte_level_vocab()
    tokenizer = CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77)
    torch.manual_seed(0)
    text_encoder = CLIPTextModel(CLIPTextConfig(**text_cfg, bos_token_id=0, eos_token_id=1,
                                                pad_token_id=1))  # fmt: skip
    unet = UNet2DConditionModel(**unet_cfg)
    vae = AutoencoderKL(**vae_cfg)
    scheduler_config = dict(tiny.SD15_SCHEDULER)
    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
        scheduler=DDIMScheduler.from_config(scheduler_config), safety_checker=None,
        feature_extractor=None, requires_safety_checker=False,
    ).to(device, dtype)  # fmt: skip
    pipe.set_progress_bar_config(disable=True)
    return pipe, scheduler_config


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def unet_flops_per_row(pipe, size: int, device, dtype) -> float:
    """FLOPs of one U-Net forward per batch row (a CFG step at batch 1 is two rows)."""
    from torch.utils.flop_counter import FlopCounterMode

    h = size // pipe.vae_scale_factor
    x = torch.randn(2, 4, h, h, device=device, dtype=dtype)
    ctx = torch.randn(2, 77, pipe.text_encoder.config.hidden_size, device=device, dtype=dtype)
    counter = FlopCounterMode(display=False)
    with counter, torch.inference_mode():
        pipe.unet(x, torch.tensor([500, 500], device=device), encoder_hidden_states=ctx)
    return counter.get_total_flops() / 2


def run_diffusers(pipe, batch, size, steps, device) -> float:
    prompts = [f"a photo of object {i}" for i in range(batch)]
    generators = [torch.Generator("cpu").manual_seed(i) for i in range(batch)]
    sync(device)
    t = time.perf_counter()
    pipe(prompts, num_inference_steps=steps, guidance_scale=7.5, height=size, width=size,
         generator=generators, output_type="np")  # fmt: skip
    sync(device)
    return time.perf_counter() - t


def run_engine(pipe, scheduler_config, batch, size, steps, device, dtype) -> tuple[float, float]:
    """Returns (wall seconds, seconds inside U-Net steps)."""
    from sdserve.pipeline.denoise import DenoiseJob, make_sample
    from sdserve.pipeline.engine import DenoiseEngine
    from sdserve.pipeline.text import TextEncoder

    encoder = TextEncoder.from_parts(pipe.tokenizer, pipe.text_encoder)
    unet_s = 0.0

    def on_stats(stats):
        nonlocal unet_s
        unet_s += stats.duration_s

    engine = DenoiseEngine(pipe.unet, max_batch_size=batch, on_stats=on_stats)

    f = pipe.vae_scale_factor
    sync(device)
    t = time.perf_counter()
    jobs = []
    for i in range(batch):
        cond, uncond = encoder.encode(f"a photo of object {i}", "", with_uncond=True)
        sample = make_sample(cond=cond, uncond=uncond, guidance_scale=7.5, scheduler_name="ddim",
                             scheduler_config=scheduler_config, steps=steps, seed=i,
                             latent_shape=(4, size // f, size // f), device=device,
                             dtype=dtype)  # fmt: skip
        job = DenoiseJob(request_id=str(i), samples=[sample])
        engine.submit(job)
        jobs.append(job)
    while engine.counts() != (0, 0):
        engine.step()
    with torch.inference_mode():
        for job in jobs:
            latents = job.samples[0].latents / pipe.vae.config.scaling_factor
            pipe.vae.decode(latents, return_dict=False)
    sync(device)
    return time.perf_counter() - t, unet_s


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="bench/results/gpu_engine.json")
    parser.add_argument("--smoke", action="store_true", help="tiny model on CPU, a few steps")
    parser.add_argument("--batches", default="1,4,8,16")
    args = parser.parse_args()
    if args.smoke:
        arch, size, steps, device, dtype = "tiny", 64, 4, torch.device("cpu"), torch.float32
    else:
        if not torch.cuda.is_available():
            print("no CUDA device: run with --smoke to check the script on a CPU", file=sys.stderr)
            return 2
        arch, size, steps, device, dtype = "sd15", 512, 25, torch.device("cuda"), torch.float16
    batches = [int(b) for b in args.batches.split(",")]
    card = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    print(f"{arch} {size}x{size}, {steps} steps, {dtype}, on {card}", flush=True)

    pipe, scheduler_config = build(arch, device, dtype)
    flops_row = unet_flops_per_row(pipe, size, device, dtype)
    print(f"U-Net: {2 * flops_row / 1e9:.2f} GFLOP per CFG step at batch 1", flush=True)
    run_diffusers(pipe, 1, size, 2, device)  # warm-up
    run_engine(pipe, scheduler_config, 1, size, 2, device, dtype)

    rows = []
    for batch in batches:
        d = min(run_diffusers(pipe, batch, size, steps, device) for _ in range(2))
        e, unet_s = min(
            (run_engine(pipe, scheduler_config, batch, size, steps, device, dtype)
             for _ in range(2)), key=lambda r: r[0])  # fmt: skip
        tflops = flops_row * 2 * batch * steps / unet_s / 1e12
        rows.append({"batch": batch, "diffusers_img_s": batch / d, "engine_img_s": batch / e,
                     "engine_unet_tflops": tflops})  # fmt: skip
        print(f"batch {batch:>2}: diffusers {batch / d:7.2f} img/s   engine {batch / e:7.2f} img/s"
              f"   U-Net {tflops:7.1f} TFLOP/s", flush=True)  # fmt: skip
    base = rows[0]["diffusers_img_s"]
    ratio = rows[-1]["engine_img_s"] / base
    print(f"engine at batch {rows[-1]['batch']} / diffusers at batch 1: {ratio:.2f}x")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"arch": arch, "size": size, "steps": steps, "device": card,
                               "dtype": str(dtype), "unet_flops_per_row": flops_row,
                               "rows": rows, "engine_b_max_over_diffusers_b1": ratio},
                              indent=2))  # fmt: skip
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
