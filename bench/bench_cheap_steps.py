"""Cheaper steps against exact ones, side by side: guidance truncation and DeepCache.

    .venv/bin/python bench/bench_cheap_steps.py [--quick | --smoke] [--out FILE.json]

For the built-in default model and `tiny-sd15-layout` (SD 1.5's U-Net block structure at a
narrow width), a closed loop of 16 clients sends the same requests four ways: exact, with
`guidance_stop 0.4`, with `cache_interval 3`, and with both. The requests run through
sdserve's request path in-process (`StagePath` over `InProcessStageClient`: the orchestration,
stage services and step-batching engine that serving runs, without Ray's hops), in interleaved
rounds so that this shared machine's drift hits every configuration alike.

It reports, per configuration: images/s (median over rounds) and its ratio to the exact run,
U-Net rows per image (a guided step costs two rows), shallow rows per image (DeepCache), and
U-Net GFLOPs per image, from torch's FlopCounterMode on one full and one shallow forward of a
row. The external baseline for the exact run is diffusers' pipeline, in bench_batching.py and
bench_serving.py.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from sdserve.api.proto import fields_from_pb
from sdserve.config import SdserveConfig
from sdserve.loadtest import Mix, drive
from sdserve.orchestration.in_process import InProcessStageClient
from sdserve.orchestration.path import StagePath
from sdserve.pipeline import deepcache
from sdserve.testing.tiny import make_tiny_model

CONFIGS = {
    "exact": {},
    "guidance_stop 0.4": {"guidance_stops": (0.4,)},
    "cache_interval 3": {"cache_intervals": (3,)},
    "both": {"guidance_stops": (0.4,), "cache_intervals": (3,)},
}
PROMPTS = (
    "a red circle on a blue background",
    "a large green square on a white background",
    "a yellow triangle on a black background",
    "a small purple circle on an orange background",
)


def flops_per_row(denoiser, levels: int = 0) -> tuple[float, float]:
    """U-Net FLOPs of one row: a full forward, and a shallow (DeepCache) forward."""
    from torch.utils.flop_counter import FlopCounterMode

    unet = denoiser.unet
    _, h, w = denoiser.latent_shape(*denoiser.native_size)
    x = torch.randn(1, unet.config.in_channels, h, w, dtype=unet.dtype)
    t = torch.tensor([500.0])
    context = torch.randn(1, 77, unet.config.cross_attention_dim, dtype=unet.dtype)
    with torch.inference_mode():
        with FlopCounterMode(display=False) as full, deepcache.capture(unet, levels) as deep:
            unet(x, t, encoder_hidden_states=context)
        with FlopCounterMode(display=False) as shallow:
            deepcache.shallow_forward(unet, x, t, context, deep[0], levels)
    return full.get_total_flops(), shallow.get_total_flops()


def run_config(path: StagePath, mix: Mix, concurrency: int, requests: int) -> dict:
    """One closed loop; images/s and the Denoiser's row counters over it."""
    service = path.client.denoiser

    async def send(request) -> int:
        params = await path.validate(fields_from_pb(request))
        result = [event async for event in path.run(params)][-1]
        return len(result.pngs)

    before = service.stats_message()
    report = asyncio.run(drive(send, mix=mix, concurrency=concurrency, requests=requests))
    after = service.stats_message()
    summary = report.summary()
    assert summary["ok"] == requests, summary
    return {
        "images_per_s": summary["images_per_s"],
        "p50_s": summary["p50_s"],
        "images": summary["images"],
        "rows": after.unet_rows - before.unet_rows,
        "shallow_rows": after.shallow_rows - before.shallow_rows,
        "forwards": after.unet_steps - before.unet_steps,
    }


def bench_model(name: str, model: Path | None, rounds: int, concurrency: int, requests: int,
                levels: int = 0):  # fmt: skip
    # eager: DeepCache's rows always run eagerly, so full rows do too, for a like comparison
    config = SdserveConfig.model_validate({"model": {"path": str(model) if model else None},
                                           "engine": {"deepcache_levels": levels,
                                                      "compile": "off"}})  # fmt: skip
    client = InProcessStageClient.from_config(config)
    path = StagePath(client, config)
    service = client.denoiser
    full_flops, shallow_flops = service.torch.call(flops_per_row, service.denoiser, levels)
    d = config.defaults
    print(f"{name}: {d.steps} steps of {d.scheduler}, guidance {d.guidance_scale}; one row "
          f"{full_flops / 1e9:.3f} GFLOPs full, {shallow_flops / 1e9:.3f} shallow",
          flush=True)  # fmt: skip
    runs: dict[str, list[dict]] = {label: [] for label in CONFIGS}
    try:
        run_config(path, Mix(prompts=PROMPTS), concurrency, min(requests, 8))  # warm-up
        for r in range(rounds):
            for label, knobs in CONFIGS.items():
                one = run_config(path, Mix(prompts=PROMPTS, **knobs), concurrency, requests)
                runs[label].append(one)
                print(f"  round {r + 1} {label:<18} {one['images_per_s']:6.2f} img/s", flush=True)
    finally:
        client.close()
    results = {}
    for label, items in runs.items():
        images = sum(i["images"] for i in items)
        rows = sum(i["rows"] for i in items)
        shallow = sum(i["shallow_rows"] for i in items)
        results[label] = {
            "images_per_s": statistics.median(i["images_per_s"] for i in items),
            "rounds": [i["images_per_s"] for i in items],
            "rows_per_image": rows / images,
            "shallow_rows_per_image": shallow / images,
            "gflops_per_image": ((rows - shallow) * full_flops + shallow * shallow_flops)
            / images
            / 1e9,
        }
    exact = results["exact"]["images_per_s"]
    for result in results.values():
        result["vs_exact"] = result["images_per_s"] / exact
    return {"steps": d.steps, "scheduler": d.scheduler, "guidance": d.guidance_scale,
            "deepcache_levels": levels,
            "full_gflops_per_row": full_flops / 1e9,
            "shallow_gflops_per_row": shallow_flops / 1e9, "results": results}  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="bench/results/cheap-steps.json", help="JSON report")
    parser.add_argument("--quick", action="store_true", help="one round of 32 requests")
    parser.add_argument("--smoke", action="store_true", help="checks that the script runs")
    parser.add_argument("--deepcache-levels", type=int, default=0, metavar="K",
                        help="engine.deepcache_levels: depth of DeepCache's shallow branch "
                        "(default %(default)s)")  # fmt: skip
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    rounds, concurrency, requests = (1, 4, 4) if args.smoke else (1, 16, 32) if args.quick \
        else (2, 16, 32)  # fmt: skip
    report = {"cpus": os.cpu_count(), "torch": torch.__version__, "concurrency": concurrency,
              "deepcache_levels": args.deepcache_levels,
              "requests_per_run": requests, "rounds": rounds, "models": {}}  # fmt: skip
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        sd15_layout = make_tiny_model(Path(tmp) / "m", arch="tiny-sd15-layout")
        models = {"default": None, "tiny-sd15-layout": sd15_layout}
        for name, model in models.items():
            report["models"][name] = bench_model(name, model, rounds, concurrency, requests,
                                                 args.deepcache_levels)  # fmt: skip
    print(f"\nconcurrency {concurrency}, {rounds} interleaved round(s) of {requests} requests "
          f"per configuration ({time.perf_counter() - started:.0f} s):\n")  # fmt: skip
    print(
        "| model | configuration | images/s | vs exact | U-Net rows / image "
        "| of them shallow | GFLOPs / image |"
    )
    print("|---|---|---:|---:|---:|---:|---:|")
    for name, model in report["models"].items():
        for label, r in model["results"].items():
            print(f"| {name} | {label} | {r['images_per_s']:.2f} | {r['vs_exact']:.2f}x "
                  f"| {r['rows_per_image']:.1f} | {r['shallow_rows_per_image']:.1f} "
                  f"| {r['gflops_per_image']:.2f} |")  # fmt: skip
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
