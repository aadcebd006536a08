"""Compiled U-Net forwards against eager ones on a mixed load: the speed-up, and the compiles
after warm-up (there must be none).

    .venv/bin/python bench/bench_compile.py [--models default,tiny-sd15-layout] [--rounds 3]
                                            [--requests 96] [--smoke] [--out FILE.json]

For each model, sdserve's request path runs twice in this process (`StagePath` over
`InProcessStageClient`: the stages and the step-batching engine that serving runs, without
Ray's hops, which compilation does not touch), with the same configuration but
`engine.compile`:

  eager     off;
  compiled  default: what `auto` picks on a CPU for these small U-Nets (inductor, one graph
            with dynamic batch and size, compiled and warmed at start-up for the native size and
            `engine.compile_sizes`, here the second size of the mix).

Both run in the default dtype (`auto`: bfloat16 on a CPU with bf16 matmuls) and the default
thread plan. A closed loop of 16 clients sends a mixed load whose options cycle independently:
steps 10/25/50, samplers ddim/euler/dpmpp_2m/euler_ancestral, guidance 7.5/3/1 (1: no
unconditional rows), sizes 64x64 and 96x64; so forwards see every row count from 1 to 32 and
both latent sizes. Rounds alternate eager and compiled. It prints images/s and the U-Net's
seconds per image (medians over rounds), the ratios compiled / eager, the start-up compile
time, and the compiles counted while serving (`sdserve_compiles_total{phase="serving"}`),
which must stay 0.

This is the speed-up of compilation alone, on one torch thread per process as the in-process
path runs; `bench/bench_serving.py` measures the served default (compiled) against its peers.
`--smoke`: the tiny model, a few requests, both runs eager (checks the script in seconds).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from sdserve.config import SdserveConfig
from sdserve.constants import DEFAULT_MODEL_DIR
from sdserve.loadtest import Mix
from sdserve.orchestration.in_process import InProcessStageClient
from sdserve.orchestration.path import StagePath
from sdserve.testing.tiny import make_tiny_model

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_cheap_steps import run_config  # noqa: E402

PROMPTS = ("a red circle on a blue background", "a green square on a white background",
           "a yellow triangle on a black background")  # fmt: skip
MIX = dict(steps=(10, 25, 50), schedulers=("ddim", "euler", "dpmpp_2m", "euler_ancestral"),
           guidances=(7.5, 3.0, 1.0), widths=(64, 96), heights=(64,))  # fmt: skip
SECOND_SIZE = (96, 64)


def model_folder(name: str, tmp: Path) -> Path:
    if name == "default":
        return DEFAULT_MODEL_DIR
    return make_tiny_model(tmp / name, seed=0, arch=name)


def serve_path(folder: Path, compile_mode: str) -> tuple[StagePath, float]:
    """sdserve's request path on `folder` with `engine.compile`; (path, seconds to start)."""
    config = SdserveConfig.model_validate({
        "model": {"path": str(folder)},
        "engine": {"compile": compile_mode, "compile_sizes": [SECOND_SIZE]},
    })  # fmt: skip
    started = time.perf_counter()
    client = InProcessStageClient.from_config(config)
    return StagePath(client, config), time.perf_counter() - started


def bench_model(name: str, folder: Path, args) -> dict:
    mix = Mix(prompts=PROMPTS, **dict(MIX, steps=(2, 3) if args.smoke else MIX["steps"]))
    modes = {"eager": "off", "compiled": "off" if args.smoke else "default"}
    paths, startup = {}, {}
    for label, mode in modes.items():
        print(f"{name}: starting {label} (engine.compile: {mode}) ...", flush=True)
        paths[label], startup[label] = serve_path(folder, mode)
        print(f"{name}: {label} ready in {startup[label]:.0f}s", flush=True)
    runs: dict[str, list[dict]] = {label: [] for label in modes}
    compiles: dict[str, int] = {}
    try:
        for label, path in paths.items():  # warm-up: the first requests of each kind
            run_config(path, mix, args.concurrency, min(args.requests, 16))
            compiles[label] = path.client.denoiser.stats_message().recompiles
        for r in range(args.rounds):
            for label, path in paths.items():
                service = path.client.denoiser
                before = service.stats_message()
                run = run_config(path, mix, args.concurrency, args.requests)
                after = service.stats_message()
                run["unet_s_per_image"] = (after.unet_seconds - before.unet_seconds) / run["images"]
                runs[label].append(run)
                print(f"  round {r + 1} {label:>8}: {run['images_per_s']:6.2f} img/s, U-Net "
                      f"{run['unet_s_per_image'] * 1e3:6.1f} ms per image", flush=True)  # fmt: skip
        recompiles = {label: path.client.denoiser.stats_message().recompiles - compiles[label]
                      for label, path in paths.items()}  # fmt: skip
        recompiles_total = {label: path.client.denoiser.stats_message().recompiles
                            for label, path in paths.items()}  # fmt: skip
    finally:
        for path in paths.values():
            path.client.close()
    median = {label: {key: statistics.median(run[key] for run in rs)
                      for key in ("images_per_s", "unet_s_per_image", "p50_s")}
              for label, rs in runs.items()}  # fmt: skip
    ratios = {
        "compiled / eager images/s": median["compiled"]["images_per_s"]
        / median["eager"]["images_per_s"],
        "eager / compiled U-Net seconds per image": median["eager"]["unet_s_per_image"]
        / median["compiled"]["unet_s_per_image"],
    }
    print(f"{name}: compiled / eager {ratios['compiled / eager images/s']:.2f}x images/s, "
          f"U-Net {ratios['eager / compiled U-Net seconds per image']:.2f}x faster per image; "
          f"compiles while serving: {recompiles_total['compiled']} (after the warm-up requests "
          f"{recompiles['compiled']}); start-up {startup['compiled']:.0f}s compiled, "
          f"{startup['eager']:.0f}s eager", flush=True)  # fmt: skip
    return {"startup_s": startup, "runs": runs, "median": median, "ratios": ratios,
            "recompiles_while_serving": recompiles_total,
            "recompiles_after_warmup_requests": recompiles}  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="default,tiny-sd15-layout",
                        help="comma-separated: default, tiny-sd15-layout, tiny")  # fmt: skip
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--requests", type=int, default=96, help="requests per run")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--smoke", action="store_true", help="tiny model, eager, seconds")
    parser.add_argument("--out", help="JSON (default bench/results/compile.json)")
    args = parser.parse_args()
    names = args.models.split(",")
    if args.smoke:
        names, args.rounds, args.requests, args.concurrency = ["tiny"], 1, 6, 4
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            results[name] = bench_model(name, model_folder(name, Path(tmp)), args)
    out = Path(args.out or "bench/results/compile.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    setup = {"mix": MIX, "second_size": SECOND_SIZE, "torch": torch.__version__,
             "smoke": args.smoke, **vars(args)}  # fmt: skip
    out.write_text(json.dumps({"setup": setup, "models": results}, indent=2))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
