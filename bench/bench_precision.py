"""What the default precision and compilation cost in image quality, measured on sdserve's path.

    .venv/bin/python bench/bench_precision.py [-n 480] [--sd15-steps 10]
                                              [--out bench/results/precision.json] [--smoke]

In one run:

  1. adherence of the built-in model (`eval-default-model`'s prompts, seeds and checker) in
     float32 eager, in this machine's default dtype eager, and in the default configuration
     (default dtype, compiled U-Net), images made through sdserve's own path (TextEncoder, the
     Denoiser's engine, VaeDecoder): foreground color, background color and shape, and the
     shape verdicts that flipped against float32 (lost / gained);
  2. batch invariance: 16 requests of the built-in model (mixed guidance) denoised together
     against each alone, in the default dtype eager and compiled: the largest pixel difference;
  3. SD 1.5's full architecture (random weights, same seed, 512x512, DPM-Solver++): the mean
     and largest pixel difference between float32 eager and the default configuration.

`--smoke` runs the tiny model briefly (eager), to check the script.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from sdserve.constants import DEFAULT_MODEL_DIR
from sdserve.pipeline import precision
from sdserve.pipeline.engine import DenoiseEngine, Finished
from sdserve.shapes.adherence import ShapeClassifier, check
from sdserve.shapes.evaluate import eval_captions, generate
from sdserve.shapes.recipe import EVAL_SEED
from sdserve.shapes.served import ServedParts
from sdserve.testing.tiny import make_tiny_model

AUTO = precision.dtype_name(precision.auto_dtype(torch.device("cpu")))
EVAL_PROMPTS = 96
"""eval-default-model's prompt count (the figures of docs/built-in-model.md's adherence
table)."""
CONFIGS = {"float32 eager": ("float32", "off"),
           # on a CPU without bf16 matmuls the default dtype is float32: no second eager row
           **({f"{AUTO} eager": ("auto", "off")} if AUTO != "float32" else {}),
           f"{AUTO} compiled (default)": ("auto", "auto")}  # fmt: skip
"""Label -> (dtype, engine.compile)."""


def adherence(model: Path, n: int, runs: list[tuple[str, int]], compile_ok: bool) -> dict:
    captions, shapes = eval_captions(n), ShapeClassifier.fit()
    verdicts: dict[tuple[str, str], list] = {}
    for label, (dtype, mode) in CONFIGS.items():
        parts = ServedParts.load(model, dtype, mode if compile_ok else "off")
        for sampler, steps in runs:
            images = generate(parts, [c.prompt for c in captions], sampler=sampler,
                              steps=steps, guidance=7.5, seed=EVAL_SEED)  # fmt: skip
            verdicts[label, sampler] = [check(i, c, shapes)
                                        for i, c in zip(images, captions, strict=True)]  # fmt: skip
    out = {}
    # eval_captions(96) is eval_captions(n)'s first 96, with the same seeds: the figures of
    # eval-default-model's 96 prompts come from the same images.
    for count in dict.fromkeys((n, min(n, EVAL_PROMPTS))):
        print(f"  over the first {count} prompts:", flush=True)
        for sampler, steps in runs:
            reference = verdicts["float32 eager", sampler][:count]
            for label in CONFIGS:
                v = verdicts[label, sampler][:count]
                row = {k: sum(getattr(x, k) for x in v) / count
                       for k in ("color", "background", "shape")}  # fmt: skip
                pairs = list(zip(reference, v, strict=True))
                row["shape_lost"] = sum(r.shape and not x.shape for r, x in pairs)
                row["shape_gained"] = sum(x.shape and not r.shape for r, x in pairs)
                out[f"{count} prompts, {sampler}:{steps} {label}"] = row
                print(f"  {sampler}:{steps:<3} {label:<28} foreground {row['color']:6.1%}  "
                      f"background {row['background']:6.1%}  shape {row['shape']:6.1%}  (shape "
                      f"verdicts against float32: -{row['shape_lost']} +{row['shape_gained']})",
                      flush=True)  # fmt: skip
    return out


def invariance(model: Path, compile_ok: bool, steps: int = 25) -> dict:
    """The largest pixel difference of each of 16 requests between its batch and alone."""
    colors = ["red", "green", "blue", "yellow", "purple", "orange", "white", "black"]
    prompts = [f"a {colors[i % 8]} {['circle', 'square', 'triangle'][i % 3]} on a "
               f"{colors[(i + 3) % 8]} background" for i in range(16)]  # fmt: skip
    guidance = [7.5, 7.5, 3.0, 1.0]
    out = {}
    for label, (dtype, mode) in list(CONFIGS.items())[1:]:
        parts = ServedParts.load(model, dtype, mode if compile_ok else "off")
        together = _denoise(parts, list(enumerate(prompts)), guidance, steps)
        diffs = []
        for i, prompt in enumerate(prompts):
            alone = _denoise(parts, [(i, prompt)], guidance, steps)[i]
            a, b = parts.vae.decode(alone).astype(int), parts.vae.decode(together[i]).astype(int)
            diffs.append(int(np.abs(a - b).max()))
        out[label] = diffs
        print(f"  {label:<28} largest pixel difference, batched against alone, per request: "
              f"{diffs}", flush=True)  # fmt: skip
    return out


def _denoise(parts, requests, guidance, steps) -> dict:
    text, denoiser, _ = parts
    done: dict = {}
    engine = DenoiseEngine(denoiser.unet, max_batch_size=16, forward=denoiser.forward)
    for i, prompt in requests:
        g = guidance[i % len(guidance)]
        emb = text.encode(prompt, "", with_uncond=g > 1)
        engine.submit(denoiser.make_job(
            str(i), emb.cond, emb.uncond, width=denoiser.native_size[0],
            height=denoiser.native_size[1], steps=steps, guidance_scale=g, scheduler="ddim",
            seeds=[100 + i], on_event=lambda e, i=i: done.__setitem__(i, e.latents)
            if isinstance(e, Finished) else None,
        ))  # fmt: skip
    while engine.step() is not None or engine.counts() != (0, 0):
        pass
    return done


def sd15_pixels(folder: Path, steps: int, size: int, compile_ok: bool) -> dict:
    """Mean and largest pixel difference of one image between float32 eager and the default."""
    images = {}
    for label, (dtype, mode) in (("float32 eager", CONFIGS["float32 eager"]),
                                 ("default", ("auto", "auto"))):  # fmt: skip
        parts = ServedParts.load(folder, dtype, mode if compile_ok else "off", max_rows=2)
        started = time.perf_counter()
        (image,) = parts.generate(["a photo of a lighthouse at dusk"], sampler="dpmpp_2m",
                                  steps=steps, guidance=7.5, seed=1)  # fmt: skip
        print(f"  {label}: {time.perf_counter() - started:.1f}s", flush=True)
        images[label] = np.asarray(image).astype(int)
    diff = np.abs(images["float32 eager"] - images["default"])
    out = {"size": size, "steps": steps, "mean": float(diff.mean()), "max": int(diff.max())}
    print(f"  {size}x{size}, {steps} steps: pixel difference mean {out['mean']:.2f}, largest "
          f"{out['max']} (of 255)", flush=True)  # fmt: skip
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-n", type=int, default=480, help="prompts (default %(default)s)")
    parser.add_argument("--sd15-steps", type=int, default=10)
    parser.add_argument("--out", default="bench/results/precision.json")
    parser.add_argument("--smoke", action="store_true", help="the tiny model, eager, briefly")
    args = parser.parse_args()
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        if args.smoke:
            tiny = make_tiny_model(Path(tmp) / "tiny")
            model, n, runs, sd15, size = tiny, 8, [("ddim", 4)], tiny, 64
        else:
            from sdserve.pipeline.models import save_sd_folder, sd_pipeline
            from sdserve.testing.architectures import random_parts

            parts = random_parts("sd15")
            sd15 = Path(tmp) / "sd15"
            save_sd_folder(sd_pipeline(parts["vae"], parts["text_encoder"], parts["tokenizer"],
                                       parts["unet"]), sd15)  # fmt: skip
            del parts
            model, n, runs, size = DEFAULT_MODEL_DIR, args.n, [("ddim", 25), ("dpmpp_2m", 20)], 512
        compile_ok = not args.smoke
        print(f"adherence over {n} prompts (sdserve's path):", flush=True)
        result = {"adherence": adherence(model, n, runs, compile_ok)}
        print("batch invariance (16 requests, 25 DDIM steps):", flush=True)
        result["invariance"] = invariance(model, compile_ok, 4 if args.smoke else 25)
        print(f"SD 1.5's architecture{' (smoke: tiny)' if args.smoke else ''}:", flush=True)
        result["sd15"] = sd15_pixels(sd15, 2 if args.smoke else args.sd15_steps, size, compile_ok)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    setup = {"default_dtype": AUTO, "prompts": n, "torch": torch.__version__,
             "smoke": args.smoke}  # fmt: skip
    out.write_text(json.dumps({"setup": setup, **result}, indent=2))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
