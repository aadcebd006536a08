"""LoRA per request: requests with different adapters in one batch, against no adapters and
against one adapter set per forward, side by side.

    .venv/bin/python bench/bench_lora.py [--rounds 3] [--requests 64] [--rank 8]
                                         [--smoke] [--out FILE.json]

On the built-in default model, four random LoRA adapters (rank `--rank`, every attention
projection of the U-Net) sit in a temporary adapter folder. A closed loop of 16 clients sends
the same requests (25 steps of DDIM, guidance 7.5, 64x64) three ways, in interleaved rounds:

  none      no adapter;
  mixed     the 4 adapters spread over the requests in turn; a U-Net forward holds rows of
            every adapter (sdserve's default, `engine.lora_policy: mixed`);
  one_set   the same requests, but a forward holds the rows of one adapter set only, the sets
            taking turns (`engine.lora_policy: one_set`: what servers that apply one adapter
            per batch do).

The requests run through sdserve's request path in-process (`StagePath` over
`InProcessStageClient`: the stages and the step-batching engine that serving runs, without
Ray's hops, which are the same for all three). For scale, the external baseline is diffusers'
pipeline with `load_lora_weights` and `set_adapters` per request, one request at a time (what a
script would do). It prints images/s (median over rounds) and the ratios mixed / none and
mixed / one_set, and the U-Net forwards per image of each.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
from pathlib import Path

import torch

from sdserve.config import SdserveConfig
from sdserve.constants import DEFAULT_MODEL_DIR
from sdserve.loadtest import Mix, drive
from sdserve.orchestration.in_process import InProcessStageClient
from sdserve.orchestration.path import StagePath
from sdserve.testing.loras import write_random_lora

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_cheap_steps import PROMPTS, run_config  # noqa: E402

ADAPTERS = ("a", "b", "c", "d")


def write_adapters(unet, folder: Path, rank: int) -> None:
    """The four random adapters of `unet` (every attention projection), one file each."""
    for i, name in enumerate(ADAPTERS):
        write_random_lora(unet, folder / f"{name}.safetensors", seed=i, rank=rank)


def mix(loras: bool, steps: int, prompts=PROMPTS, size: int | None = None) -> Mix:
    """The requests: the four adapters in turn (`loras`) or none; `size`: None, the model's."""
    sets = tuple(((name, 1.0),) for name in ADAPTERS) if loras else ((),)
    return Mix(prompts=prompts, steps=(steps,), schedulers=("ddim",), widths=(size,),
               heights=(size,), guidances=(7.5,), loras=sets)  # fmt: skip


def rounds(path: StagePath, args, mix_of=None) -> dict[str, list[dict]]:
    """Interleaved rounds of the three loads; `mix_of(loras: bool)` makes the requests (default:
    the built-in model's, `mix`)."""
    mix_of = mix_of or (lambda loras: mix(loras, args.steps))
    engine = path.client.denoiser.engine
    loads = {"none": (False, "mixed"), "mixed": (True, "mixed"), "one_set": (True, "one_set")}
    runs: dict[str, list[dict]] = {label: [] for label in loads}
    run_config(path, mix_of(True), args.concurrency, 8)  # warm-up: loads the adapters
    for r in range(args.rounds):
        for label, (loras, policy) in loads.items():
            engine.lora_policy = policy
            one = run_config(path, mix_of(loras), args.concurrency, args.requests)
            runs[label].append(one)
            print(
                f"  round {r + 1} {label:<8} {one['images_per_s']:6.2f} img/s, "
                f"{one['forwards'] / one['images']:.2f} forwards per image",
                flush=True,
            )
    engine.lora_policy = "mixed"
    return runs


def diffusers_baseline(folder: Path, args) -> dict:
    """diffusers, one request at a time, switching adapters per request."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(DEFAULT_MODEL_DIR, torch_dtype=torch.float32,
                                                   local_files_only=True)  # fmt: skip
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return adapters_one_at_a_time(pipe, folder, mix(True, args.steps), 2 if args.smoke else 8)


def adapters_one_at_a_time(pipe, folder: Path, requests: Mix, n: int, **call) -> dict:
    """`n` requests of `requests` through diffusers' `pipe`, one at a time, each with its adapter
    set by `set_adapters` (the adapters loaded once with `load_lora_weights`)."""
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.set_verbosity_error()  # loading adapter b lists a's keys as "missing"
    for name in ADAPTERS:
        pipe.load_lora_weights(folder / f"{name}.safetensors", adapter_name=name)

    async def send(request) -> int:
        pipe.set_adapters([request.loras[0].name], adapter_weights=[request.loras[0].scale])
        pipe(request.prompt, num_inference_steps=request.steps, guidance_scale=7.5,
             generator=torch.Generator().manual_seed(request.seed), output_type="np",
             **call)  # fmt: skip
        return 1

    report = asyncio.run(drive(send, mix=requests, concurrency=1, requests=n))
    summary = report.summary()
    print(f"  diffusers, one request at a time with set_adapters: "
          f"{summary['images_per_s']:.2f} img/s", flush=True)  # fmt: skip
    return summary


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--requests", type=int, default=64, help="requests per run")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--rank", type=int, default=8, help="the adapters' rank (default 8)")
    parser.add_argument("--smoke", action="store_true", help="seconds: checks the script")
    parser.add_argument("--out", help="JSON (default bench/results/lora.json)")
    args = parser.parse_args()
    if args.smoke:
        args.rounds, args.requests, args.concurrency, args.steps = 1, 8, 4, 2
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        from sdserve.pipeline.denoise import Denoiser

        write_adapters(Denoiser(DEFAULT_MODEL_DIR).unet, folder, args.rank)
        # eager: rows with adapters always run eagerly, so rows without do too, alike
        config = SdserveConfig.model_validate({"model": {"lora_dir": str(folder)},
                                               "engine": {"compile": "off"}})  # fmt: skip
        client = InProcessStageClient.from_config(config)
        try:
            runs = rounds(StagePath(client, config), args)
        finally:
            client.close()
        baseline = diffusers_baseline(folder, args)
    write_report(Path(args.out or "bench/results/lora.json"), args, runs, baseline)
    return 0


def write_report(out: Path, args, runs: dict[str, list[dict]], baseline: dict,
                 **extra) -> None:  # fmt: skip
    """Prints the medians and the ratios mixed / none and mixed / one_set; writes the JSON."""
    medians = {k: statistics.median(r["images_per_s"] for r in v) for k, v in runs.items()}
    ratios = {"mixed / none": medians["mixed"] / medians["none"],
              "mixed / one_set": medians["mixed"] / medians["one_set"]}  # fmt: skip
    print(f"images/s (median of {args.rounds}): " + ", ".join(
        f"{k} {v:.2f}" for k, v in medians.items()) + "; " + ", ".join(
        f"{k} {v:.2f}x" for k, v in ratios.items()))  # fmt: skip
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"args": vars(args), **extra, "runs": runs,
                               "median_images_per_s": medians, "ratios": ratios,
                               "diffusers_one_at_a_time": baseline}, indent=2))  # fmt: skip
    print(f"wrote {out}")


if __name__ == "__main__":
    sys.exit(main())
