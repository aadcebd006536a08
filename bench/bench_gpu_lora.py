"""LoRA per request on a GPU: four adapters mixed in one U-Net forward, against no adapters and
against one adapter set per forward, side by side (issue 17's bench on the hardware its claim is
about).

    python bench/bench_gpu_lora.py [--out bench/results/gpu_lora.json]
    python bench/bench_gpu_lora.py --smoke     # tiny model, CPU, seconds: checks the script

SD 1.5's architecture with random weights (as `bench_gpu_engine.py`), fp16, 512x512, 25 DDIM
steps, guidance 7.5; four random adapters of rank `--rank` on every attention projection of the
U-Net (`sdserve.testing.loras.write_random_lora`). A closed loop of 16 clients sends the same
requests three ways, in interleaved rounds (as `bench_lora.py` does on the CPU):

  none      no adapter;
  mixed     the 4 adapters spread over the requests in turn, rows of every adapter in one
            forward (`engine.lora_policy: mixed`, sdserve's default);
  one_set   the same requests, a forward holding the rows of one adapter set only
            (`engine.lora_policy: one_set`: what servers that apply one adapter per batch do).

Requests run through `StagePath` over the `InProcessStageClient` (the stages and engine that
serving runs, without Ray). The external baseline, measured first on the same weights: diffusers'
pipeline with `load_lora_weights` and `set_adapters` per request, one request at a time. The
issue's targets: mixed / none >= 0.8 and mixed / one_set >= 1.5.

Needs torch, transformers, diffusers, peft, pydantic, protobuf and grpcio; not Ray or Redis.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_gpu_engine import ARCHS, Bench  # noqa: E402
from bench_lora import (  # noqa: E402
    adapters_one_at_a_time,
    mix,
    rounds,
    write_adapters,
    write_report,
)

from sdserve.pipeline.lora import load_lora  # noqa: E402
from sdserve.stages.loras import Adapters  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="bench/results/gpu_lora.json")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--requests", type=int, default=96, help="requests per run")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--rank", type=int, default=8, help="the adapters' rank (default 8)")
    parser.add_argument("--baseline-requests", type=int, default=8)
    parser.add_argument("--smoke", action="store_true", help="tiny model on CPU, a few steps")
    args = parser.parse_args()
    cuda = torch.cuda.is_available() and not args.smoke
    if not cuda and not args.smoke:
        print("no CUDA device: run with --smoke to check the script on the CPU", file=sys.stderr)
        return 2
    arch, size, steps = ARCHS["sd15"][args.smoke]
    if args.smoke:
        args.rounds, args.requests, args.concurrency, args.baseline_requests = 1, 8, 4, 2
    device = torch.device("cuda" if cuda else "cpu")
    bench = Bench(arch, size, steps, device, torch.float16 if cuda else torch.float32)
    card = torch.cuda.get_device_name() if cuda else "cpu"
    print(f"{arch} on {card}: {size}x{size}, {steps} DDIM steps, rank-{args.rank} adapters",
          flush=True)  # fmt: skip

    def requests(loras: bool):
        return mix(loras, steps, prompts=("a photo of an object",), size=size)

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        write_adapters(bench.pipe.unet, folder, args.rank)
        # diffusers first: its PEFT layers come out again before sdserve wraps the same U-Net.
        baseline = adapters_one_at_a_time(bench.pipe, folder, requests(True),
                                          args.baseline_requests, height=size,
                                          width=size)  # fmt: skip
        bench.pipe.unload_lora_weights()
        path, service = bench.path(args.concurrency)
        service.adapters = Adapters(
            folder, 2**34, lambda p, n: load_lora(p, n, unet=bench.denoiser.unet)
        )
        try:
            runs = rounds(path, args, requests)
        finally:
            service.close()
    write_report(Path(args.out), args, runs, baseline, device=card, arch=arch, size=size,
                 steps=steps)  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
