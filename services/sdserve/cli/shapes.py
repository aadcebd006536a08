"""The built-in default model's commands: `train-default-model`, `eval-default-model`,
`train-lora`, the ControlNet's (`shapes_controlnet.py`) and `check-image` (the code is in
sdserve.shapes)."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from sdserve.cli.options import Parents, progress_bars, require_extra
from sdserve.cli.shapes_controlnet import register_controlnet
from sdserve.cli.shapes_lora import add_lora_eval_options, register_train_lora, run_eval_lora


def register(sub, parents: Parents) -> None:
    # The recipe module is torch-free, so that --help shows these defaults quickly.
    from sdserve.shapes.recipe import TrainConfig

    train = sub.add_parser(
        "train-default-model",
        help="train the built-in default model on synthetic shapes (about an hour on 2 CPUs)",
        description="Write the default model's architecture with fresh weights, then train its "
        "VAE, and its CLIP text encoder and U-Net together, on seeded synthetic images of one "
        "colored shape on a plain background ('a small red circle on a blue background'). "
        "Writes a diffusers folder with fp16 weights and training.json. Runs on the CPU, "
        "with a progress bar and the loss.",
    )
    defaults = TrainConfig()
    train.add_argument("dir", help="folder to create (must not exist, or be empty)")
    train.add_argument("--seed", type=int, default=defaults.seed, help="(default %(default)s)")
    train.add_argument("--samples", type=int, default=defaults.samples,
                       help="synthetic training pairs (default %(default)s)")  # fmt: skip
    train.add_argument("--vae-steps", type=int, default=defaults.vae_steps,
                       help="(default %(default)s)")  # fmt: skip
    train.add_argument("--unet-steps", type=int, default=defaults.unet_steps,
                       help="(default %(default)s)")  # fmt: skip
    train.add_argument("--batch-size", type=int, default=defaults.batch_size,
                       help="U-Net batch size (default %(default)s)")  # fmt: skip
    train.set_defaults(func=run_train)
    register_eval(sub)
    register_train_lora(sub)
    register_controlnet(sub)
    register_check(sub)


def register_eval(sub) -> None:
    from sdserve.shapes.lora_recipe import LORA_EVAL_PROMPTS
    from sdserve.shapes.recipe import DEFAULT_GUIDANCE, DEFAULT_RUNS

    evaluate = sub.add_parser(
        "eval-default-model",
        help="measure prompt adherence (colors, shape) and time per image, per sampler",
        description="Generate images for N held-out prompts of the synthetic grammar with "
        "diffusers' StableDiffusionPipeline, check each one's foreground color, background "
        "color and shape with a checker independent of the model, and print a table per "
        "sampler and step count.",
    )
    evaluate.add_argument("--model", metavar="DIR",
                          help="model folder (default: the built-in default model)")  # fmt: skip
    evaluate.add_argument("-n", type=int,
                          help=f"prompts (default 96; with --lora, {LORA_EVAL_PROMPTS} per "
                          f"group: the first {LORA_EVAL_PROMPTS} prompts with its color that "
                          "train-lora holds out, and as many ordinary ones)")  # fmt: skip
    evaluate.add_argument("--guidance", type=float, default=DEFAULT_GUIDANCE,
                          help="classifier-free guidance scale (default %(default)s)")  # fmt: skip
    evaluate.add_argument(
        "--runs",
        type=parse_runs,
        metavar="SAMPLER:STEPS[:gsF][:ciN],...",
        help="gsF: stop guidance after the fraction F of the steps; ciN: DeepCache at interval "
        "N (e.g. ddim:25:gs0.4:ci3); default "
        + ",".join(f"{s}:{n}" for s, n in DEFAULT_RUNS)
        + " (with --lora: ddim:25)",
    )
    evaluate.add_argument(
        "--deepcache-levels", type=int, default=0, metavar="K",
        help="depth of DeepCache's shallow branch in runs with ciN (engine.deepcache_levels; "
        "default %(default)s)",
    )  # fmt: skip
    evaluate.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    evaluate.add_argument(
        "--grid", metavar="PNG", help="write the first run's first 16 images, with their prompts"
    )
    evaluate.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    evaluate.add_argument(
        "--dtype", choices=["auto", "float32", "bfloat16", "float16"],
        help="make the images through sdserve's own path (its TextEncoder, the Denoiser's "
        "batching engine, its VaeDecoder) in this dtype (auto: what the server would choose "
        "on this machine), instead of diffusers' pipeline in float32",
    )  # fmt: skip
    evaluate.add_argument(
        "--compile", default="off", choices=["off", "auto", "default", "max-autotune"],
        help="with --dtype: compile the U-Net as engine.compile does (auto: the server's "
        "default; about 2 minutes on 2 CPU cores; default %(default)s)",
    )  # fmt: skip
    add_lora_eval_options(evaluate)
    evaluate.set_defaults(func=run_eval)


def register_check(sub) -> None:
    check = sub.add_parser(
        "check-image",
        help="check an image against a prompt of the default model's grammar (or with cyan)",
        description="Print the image's foreground color, background color and shape, as the "
        "model-independent checker of `eval-default-model` sees them, next to the prompt's. "
        "Exits with 1 when one differs.",
    )
    check.add_argument("image", help="PNG file")
    check.add_argument("prompt", help="e.g. 'a red circle on a blue background'")
    check.add_argument(
        "--background-mask",
        metavar="MASK.png",
        help="also write the background as the checker sees it, white (an inpainting mask that "
        "repaints the background and keeps the shape: generate --mask MASK.png)",
    )
    check.set_defaults(func=run_check)


def run_train(args: argparse.Namespace) -> int:
    import json

    from sdserve.shapes.recipe import TrainConfig
    from sdserve.shapes.train import new_model, train

    config = TrainConfig(seed=args.seed, samples=args.samples, vae_steps=args.vae_steps,
                         unet_steps=args.unet_steps, batch_size=args.batch_size)  # fmt: skip
    out = Path(args.dir)
    if out.exists() and any(out.iterdir()):
        print(f"sdserve: {out} exists and is not empty", file=sys.stderr)
        return 1
    started = time.perf_counter()
    new_model(out, seed=args.seed)
    report = train(out, config, progress_bars())
    print(json.dumps(report, indent=2))
    print(f"wrote {out} in {time.perf_counter() - started:.0f}s")
    return 0


def parse_runs(text: str) -> list[tuple[str, int, float, int]]:
    """SAMPLER:STEPS[:gsF][:ciN],... (argparse type of --runs): gsF stops guidance after the
    fraction F of the steps, ciN turns DeepCache on at interval N."""
    from sdserve.constants import UNET_SCHEDULER_NAMES as SCHEDULER_NAMES

    runs = []
    for item in text.split(","):
        stop, interval = 1.0, 1
        try:
            sampler, steps, *knobs = item.strip().split(":")
            for knob in knobs:
                if knob.startswith("gs"):
                    stop = float(knob[2:])
                elif knob.startswith("ci"):
                    interval = int(knob[2:])
                else:
                    raise ValueError(knob)
            ok = sampler in SCHEDULER_NAMES and int(steps) >= 1 and 0 < stop <= 1 <= interval
        except ValueError:
            ok = False
        if not ok:
            raise argparse.ArgumentTypeError(
                f"{item!r}: expected SAMPLER:STEPS[:gsF][:ciN] with SAMPLER one of "
                f"{', '.join(SCHEDULER_NAMES)}, 0 < F <= 1, N >= 1"
            )
        runs.append((sampler, int(steps), stop, interval))
    return runs


def run_eval(args: argparse.Namespace) -> int:
    import json
    from dataclasses import asdict

    import torch
    from tqdm import tqdm

    from sdserve.constants import DEFAULT_MODEL_DIR
    from sdserve.shapes.adherence import ShapeClassifier
    from sdserve.shapes.evaluate import eval_captions, grid, load_pipeline, measure, table
    from sdserve.shapes.recipe import DEFAULT_RUNS

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.lora:
        return run_eval_lora(args)
    args.n = args.n or 96
    args.runs = args.runs or list(DEFAULT_RUNS)
    if not args.dtype and any(run[3:] and run[3] > 1 for run in args.runs):
        require_extra("DeepCache", "train", "eval-default-model with ciN (diffusers' side)")
    if args.dtype:
        from sdserve.pipeline.precision import dtype_name
        from sdserve.shapes.served import ServedParts

        pipe = ServedParts.load(args.model or DEFAULT_MODEL_DIR, args.dtype, args.compile)
        mode = pipe.denoiser.forward.mode if pipe.denoiser.forward else "eager"
        print(f"images through sdserve's path in {dtype_name(pipe.denoiser.dtype)}, {mode}")
    else:
        pipe = load_pipeline(args.model or DEFAULT_MODEL_DIR)
    shapes = ShapeClassifier.fit()
    captions = eval_captions(args.n)
    results = []
    for run in tqdm(args.runs, desc="evaluating", unit="run"):
        sampler, steps, stop, interval = (*run, 1.0, 1)[:4]  # the default runs have no knobs
        result, images = measure(pipe, captions, sampler=sampler, steps=steps,
                                 guidance=args.guidance, shapes=shapes, guidance_stop=stop,
                                 cache_interval=interval,
                                 cache_levels=args.deepcache_levels * (interval > 1))  # fmt: skip
        results.append(result)
        tqdm.write(table(results[-1:]).splitlines()[-1])
        if args.grid and len(results) == 1:
            n = min(len(images), 16)
            grid(images[:n], [c.prompt for c in captions[:n]]).save(args.grid)
    print(f"\nprompt adherence over {args.n} prompts, guidance {args.guidance}:\n")
    print(table(results))
    if args.json:
        Path(args.json).write_text(json.dumps([asdict(r) for r in results], indent=2) + "\n")
    if args.grid:
        print(f"\nwrote the grid of the first run's images to {args.grid}")
    return 0


def run_check(args: argparse.Namespace) -> int:
    from PIL import Image

    from sdserve.shapes.adherence import (
        ShapeClassifier,
        background_color,
        foreground_color,
        palette_for,
    )
    from sdserve.shapes.synthetic import ALL_COLORS, parse_prompt

    image = Image.open(args.image)
    if args.background_mask:
        import numpy as np

        from sdserve.shapes.adherence import foreground_mask

        background = (~foreground_mask(image)).astype(np.uint8) * 255
        Image.fromarray(background, "L").save(args.background_mask)
        print(f"wrote {args.background_mask} (white: the background)")
    caption = parse_prompt(args.prompt, colors=ALL_COLORS)  # the 8 colors and cyan
    if caption is None:
        grammar = "a [small|large] COLOR SHAPE on a COLOR background"
        print(f"{args.prompt!r} is not in the default model's grammar ({grammar!r}); "
              "nothing to check")  # fmt: skip
        return 0
    colors = palette_for(caption)  # as eval-default-model judges it
    checks = [
        ("foreground color", caption.color, foreground_color(image, colors)),
        ("background color", caption.background, background_color(image, colors)),
        ("shape", caption.shape, ShapeClassifier.fit().predict(image, colors)),
    ]
    for what, wanted, seen in checks:
        print(f"  {what}: {seen} " + ("(as prompted)" if seen == wanted else f"(prompt: {wanted})"))
    return 0 if all(wanted == seen for _, wanted, seen in checks) else 1
