"""The default model's adapter commands: `train-lora` and `eval-default-model --lora` (the code
is in sdserve.shapes.lora_train and lora_eval)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def add_lora_eval_options(evaluate: argparse.ArgumentParser) -> None:
    """eval-default-model's --lora and --color."""
    evaluate.add_argument(
        "--lora", metavar="NAME[:SCALE]",
        help="measure an adapter instead (the model's loras/NAME/, a folder or a file) through "
        "sdserve's per-row path: held-out prompts with its color with and without it, and "
        "ordinary prompts in the same batches without and with it",
    )  # fmt: skip
    evaluate.add_argument("--color", help="the color the adapter teaches (default: its name "
                          "when that is an extra color, else cyan)")  # fmt: skip


def register_train_lora(sub) -> None:
    from sdserve.shapes.lora_recipe import LORA_EVAL_PROMPTS, LoraTrainConfig

    defaults = LoraTrainConfig()
    lora = sub.add_parser(
        "train-lora",
        help="train a LoRA that teaches the default model the color cyan (minutes on 2 CPUs)",
        description="Fine-tune LoRA adapters on the default model's U-Net attention (and text "
        "encoder attention) layers, base weights frozen, on seeded synthetic images whose "
        "captions have cyan as the shape's color or the background, mixed with ordinary ones. "
        "Writes OUT_DIR/pytorch_lora_weights.safetensors (diffusers' format) and a README.md "
        "card with the numbers of `eval-default-model --lora`, measured at the end. Ctrl-C stops "
        "the training and keeps what was trained.",
    )
    lora.add_argument("dir", metavar="OUT_DIR", help="folder to create (must not exist, or be "
                      "empty); the shipped one is the default model's loras/cyan/")  # fmt: skip
    for flag, kind, what in (("--steps", int, "training steps"), ("--rank", int, "LoRA rank"),
                             ("--seed", int, "data and noise seed"), ("--lr", float, "AdamW lr"),
                             ("--batch-size", int, "batch size"),
                             ("--samples", int, "synthetic training pairs"),
                             ("--fg-share", float, "share of the cyan pairs with cyan as the "
                              "shape's color (the others: as the background)"),
                             ("--pixel-weight", float, "weight of the pixel loss through the "
                              "VAE's decoder; 0: the latent loss alone")):  # fmt: skip
        default = getattr(defaults, flag[2:].replace("-", "_"))
        lora.add_argument(flag, type=kind, default=default, help=f"{what} (default {default})")
    lora.add_argument("--no-text-encoder", action="store_true",
                      help="adapt the U-Net only (default: its text encoder too)")  # fmt: skip
    lora.add_argument("--attention-only", action="store_true",
                      help="adapt the U-Net's attention layers only (default: also the "
                      "convolutions of its last up block and conv_out)")  # fmt: skip
    lora.add_argument("--mid-convs", action="store_true",
                      help="also adapt the convolutions of the U-Net's middle up block (8x8 "
                      "latents) and its upsampler (default: no)")  # fmt: skip
    lora.add_argument("--model", metavar="DIR", help="base model (default: the built-in one)")
    lora.add_argument("--threads", type=int, help="torch threads (default: torch's; 1 is "
                      "steadier on a machine that other jobs share)")  # fmt: skip
    lora.add_argument(
        "--eval-prompts",
        type=int,
        default=LORA_EVAL_PROMPTS,
        metavar="N",
        help=f"prompts per group of the final evaluation; 0: none (default {LORA_EVAL_PROMPTS})",
    )
    lora.set_defaults(func=run_train_lora)


def _lora_command(args: argparse.Namespace) -> str:
    """The train-lora command line that `args` stand for (for the card)."""
    from sdserve.shapes.lora_recipe import LoraTrainConfig

    defaults, parts = LoraTrainConfig(), ["sdserve", "train-lora", args.dir]
    names = ("steps", "rank", "seed", "lr", "batch_size", "samples", "fg_share", "pixel_weight")
    for name in names:
        if getattr(args, name) != getattr(defaults, name) or name in ("steps", "rank"):
            parts += [f"--{name.replace('_', '-')}", f"{getattr(args, name):g}"]
    parts += ["--no-text-encoder"] * args.no_text_encoder
    parts += ["--attention-only"] * args.attention_only
    parts += ["--mid-convs"] * args.mid_convs
    parts += [f"--model {args.model}"] * bool(args.model)
    parts += [f"--threads {args.threads}"] * bool(args.threads)
    return " ".join(parts)


def run_train_lora(args: argparse.Namespace) -> int:
    import json

    import torch

    from sdserve.cli.options import progress_bars, require_extra

    require_extra("peft", "train", "sdserve train-lora")
    from sdserve.constants import DEFAULT_MODEL_DIR
    from sdserve.shapes.lora_eval import evaluate_lora, lora_table
    from sdserve.shapes.lora_recipe import LoraTrainConfig
    from sdserve.shapes.lora_train import card, train_lora

    out = Path(args.dir)
    if out.exists() and any(out.iterdir()):
        print(f"sdserve: {out} exists and is not empty", file=sys.stderr)
        return 1
    if args.threads:
        torch.set_num_threads(args.threads)
    config = LoraTrainConfig(seed=args.seed, steps=args.steps, rank=args.rank, lr=args.lr,
                             batch_size=args.batch_size, samples=args.samples,
                             fg_share=args.fg_share, pixel_weight=args.pixel_weight,
                             text_encoder=not args.no_text_encoder,
                             convs=not args.attention_only,
                             mid_convs=args.mid_convs)  # fmt: skip
    bars = progress_bars({"latents": "latents of the cyan images", "lora": "training the LoRA"})
    try:
        report = train_lora(out, config, args.model, bars)
    except KeyboardInterrupt:
        print("\ninterrupted before the training started: nothing written", file=sys.stderr)
        return 130
    evaluation, model, stopped = None, args.model or str(DEFAULT_MODEL_DIR), report["interrupted"]
    shipped = out.resolve().parent == (Path(model) / "loras").resolve()  # the model's own
    eval_command = f"sdserve eval-default-model --lora {out.name if shipped else out}"
    eval_command += f" --model {model}" * bool(args.model)
    if args.eval_prompts and not report["interrupted"]:
        try:
            evaluation = evaluate_lora(model, report["weights"], color=config.color,
                                       n=args.eval_prompts)  # fmt: skip
            print(lora_table(evaluation))
        except KeyboardInterrupt:
            print("\ninterrupted: the card has no evaluation", file=sys.stderr)
            stopped = True
    (out / "README.md").write_text(card(report, _lora_command(args), evaluation, eval_command))
    report["evaluation"] = evaluation.summary() if evaluation else None
    print(json.dumps(report, indent=2))
    print(f"wrote {out} ({report['steps_done']} steps in {report['train_seconds']}s)")
    return 130 if stopped else 0


def run_eval_lora(args: argparse.Namespace) -> int:
    import json

    from sdserve.constants import DEFAULT_MODEL_DIR
    from sdserve.shapes.evaluate import grid
    from sdserve.shapes.lora_eval import evaluate_lora, lora_table, resolve_lora
    from sdserve.shapes.lora_recipe import LORA_EVAL_PROMPTS, LORA_EVAL_RUN
    from sdserve.shapes.synthetic import EXTRA_COLORS

    model = args.model or DEFAULT_MODEL_DIR
    name, _, scale = args.lora.partition(":")
    try:
        path = resolve_lora(name, model)
    except FileNotFoundError as exc:
        print(f"sdserve: {exc}", file=sys.stderr)
        return 2
    color = args.color or (name if name in EXTRA_COLORS else "cyan")
    runs = args.runs or [(*LORA_EVAL_RUN, 1.0, 1)]
    summaries = []
    for sampler, steps, stop, interval in runs:
        result = evaluate_lora(model, path, color=color, scale=float(scale or 1), sampler=sampler,
                               steps=steps, guidance=args.guidance,
                               n=args.n or LORA_EVAL_PROMPTS, guidance_stop=stop,
                               cache_interval=interval,
                               cache_levels=args.deepcache_levels * (interval > 1))  # fmt: skip
        print(f"\n{path}: {result.mixed_forwards} of {result.forwards} U-Net forwards mixed rows "
              f"with and without it; {result.seconds_per_image:.3f} s/image\n")  # fmt: skip
        print(lora_table(result))
        summaries.append(result.summary())
        if args.grid and len(summaries) == 1:
            k = min(8, len(result.images["new+lora"]))
            images = result.images["new+lora"][:k] + result.images["new-lora"][:k]
            labels = [f"{p} ({w})" for w in ("LoRA", "base") for p in
                      (c.prompt for c in result.captions[:k])]  # fmt: skip
            grid(images, labels).save(args.grid)
    if args.json:
        Path(args.json).write_text(json.dumps(summaries, indent=2) + "\n")
    return 0
