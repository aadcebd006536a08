"""The default model's ControlNet commands: `train-controlnet`, `eval-controlnet` and
`shape-silhouette` (the code is in sdserve.shapes.controlnet_*)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def register_controlnet(sub) -> None:
    register_train(sub)
    register_eval(sub)
    register_silhouette(sub)


def register_train(sub) -> None:
    from sdserve.shapes.controlnet_recipe import ControlNetTrainConfig

    defaults = ControlNetTrainConfig()
    train = sub.add_parser(
        "train-controlnet",
        help="train the default model's `shape` ControlNet on synthetic silhouettes (about "
        "half an hour on one CPU thread)",
        description="Build a ControlNet from the default model's U-Net and train it, the model "
        "frozen, on seeded synthetic images and the white-on-black silhouettes of their shapes. "
        "Writes OUT_DIR/config.json, diffusion_pytorch_model.safetensors (fp16), training.json "
        "and a README.md card with the numbers of `eval-controlnet`, measured at the end. "
        "Ctrl-C stops the training and keeps what was trained.",
    )
    train.add_argument("dir", metavar="OUT_DIR",
                       help="folder to create (must not exist, or be empty); the shipped one "
                       "is the default model's controlnets/shape/")  # fmt: skip
    for flag, kind, what in (("--steps", int, "training steps"), ("--lr", float, "AdamW lr"),
                             ("--seed", int, "data and noise seed"),
                             ("--batch-size", int, "batch size"),
                             ("--samples", int, "synthetic training triples")):  # fmt: skip
        default = getattr(defaults, flag[2:].replace("-", "_"))
        train.add_argument(flag, type=kind, default=default, help=f"{what} (default {default})")
    train.add_argument("--model", metavar="DIR", help="base model (default: the built-in one)")
    train.add_argument("--threads", type=int, help="torch threads (default: torch's; 1 is "
                       "steadier on a machine that other jobs share)")  # fmt: skip
    train.add_argument("--eval-prompts", type=int, default=64, metavar="N",
                       help="held-out prompts of the final evaluation; 0: none "
                       "(default 64)")  # fmt: skip
    train.set_defaults(func=run_train)


def register_eval(sub) -> None:
    from sdserve.shapes.controlnet_recipe import CONTROLNET_EVAL_PROMPTS, CONTROLNET_NAME

    evaluate = sub.add_parser(
        "eval-controlnet",
        help="measure the `shape` ControlNet: overlap with held-out silhouettes, colors",
        description="Generate held-out prompts with their held-out silhouettes through "
        "sdserve's own path, with the net and without it (the same seeds), and print the share "
        "of images whose foreground overlaps the silhouette with IoU >= 0.7, the median IoU "
        "and the share with both of the prompt's colors right.",
    )
    evaluate.add_argument("net", nargs="?", default=CONTROLNET_NAME,
                          help="the model's controlnets/NAME/ or a folder (default "
                          "%(default)s)")  # fmt: skip
    evaluate.add_argument("--model", metavar="DIR",
                          help="model folder (default: the built-in default model)")  # fmt: skip
    evaluate.add_argument("-n", type=int, default=CONTROLNET_EVAL_PROMPTS,
                          help="held-out prompts (default %(default)s)")  # fmt: skip
    evaluate.add_argument("--scale", type=float, default=1.0,
                          help="controlnet conditioning scale (default %(default)s)")  # fmt: skip
    evaluate.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    evaluate.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    evaluate.add_argument("--grid", metavar="PNG", help="write the first 8 images with the "
                          "net, their silhouettes and the images without it")  # fmt: skip
    evaluate.set_defaults(func=run_eval)


def register_silhouette(sub) -> None:
    from sdserve.shapes.synthetic import SHAPES

    sil = sub.add_parser(
        "shape-silhouette",
        help="write a control image for the `shape` ControlNet: a white shape on black",
        description="Draw one shape of the default model's grammar, white on black, as the "
        "synthetic data draws it (an upward triangle, an unrotated square).",
    )
    sil.add_argument("shape", choices=SHAPES)
    sil.add_argument("out", metavar="OUT.png")
    sil.add_argument(
        "--at",
        default="0.5,0.5",
        metavar="X,Y",
        help="its center, fractions of the width and height (default %(default)s)",
    )
    sil.add_argument(
        "--extent",
        type=float,
        default=0.5,
        help="its width, a fraction of the image's (default %(default)s)",
    )
    sil.add_argument("--size", type=int, default=64, help="image side (default %(default)s)")
    sil.set_defaults(func=run_silhouette)


def resolve_net(name: str, model: str | Path) -> Path:
    """A net's folder: `name` when it is one, else the model's controlnets/NAME/."""
    from sdserve.pipeline.controlnet import controlnet_dir

    path = Path(name)
    if (path / "config.json").is_file():
        return path
    path = controlnet_dir(model) / name
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"no ControlNet {name!r} (neither a folder nor {path})")
    return path


def _train_command(args: argparse.Namespace) -> str:
    """The train-controlnet command line that `args` stand for (for the card)."""
    from sdserve.shapes.controlnet_recipe import ControlNetTrainConfig

    defaults, parts = ControlNetTrainConfig(), ["sdserve", "train-controlnet", args.dir]
    for name in ("steps", "lr", "seed", "batch_size", "samples"):
        if getattr(args, name) != getattr(defaults, name) or name == "steps":
            parts += [f"--{name.replace('_', '-')}", f"{getattr(args, name):g}"]
    parts += [f"--model {args.model}"] * bool(args.model)
    parts += [f"--threads {args.threads}"] * bool(args.threads)
    return " ".join(parts)


def run_train(args: argparse.Namespace) -> int:
    import json

    import torch

    from sdserve.cli.options import progress_bars
    from sdserve.constants import DEFAULT_MODEL_DIR
    from sdserve.shapes.controlnet_card import card
    from sdserve.shapes.controlnet_eval import controlnet_table, evaluate_controlnet
    from sdserve.shapes.controlnet_recipe import ControlNetTrainConfig
    from sdserve.shapes.controlnet_train import train_controlnet

    out = Path(args.dir)
    if out.exists() and any(out.iterdir()):
        print(f"sdserve: {out} exists and is not empty", file=sys.stderr)
        return 1
    if args.threads:
        torch.set_num_threads(args.threads)
    config = ControlNetTrainConfig(seed=args.seed, steps=args.steps, lr=args.lr,
                                   batch_size=args.batch_size, samples=args.samples)  # fmt: skip
    bars = progress_bars({"latents": "encoding the latents", "controlnet": "training the net"})
    try:
        report = train_controlnet(out, config, args.model, bars)
    except KeyboardInterrupt:
        print("\ninterrupted before the training started: nothing written", file=sys.stderr)
        return 130
    model = args.model or str(DEFAULT_MODEL_DIR)
    shipped = out.resolve().parent == (Path(model) / "controlnets").resolve()
    eval_command = f"sdserve eval-controlnet {out.name if shipped else out} --threads 1"
    eval_command += f" --model {model}" * bool(args.model)
    table = summary = None
    if args.eval_prompts and not report["interrupted"]:
        evaluation = evaluate_controlnet(model, out, n=args.eval_prompts)
        table, summary = controlnet_table(evaluation), evaluation.summary()
        print(table)
    (out / "README.md").write_text(card(report, _train_command(args), table, summary,
                                        eval_command))  # fmt: skip
    print(json.dumps({**report, "evaluation": summary}, indent=2))
    print(f"wrote {out} ({report['steps_done']} steps in {report['train_seconds']}s)")
    return 130 if report["interrupted"] else 0


def run_eval(args: argparse.Namespace) -> int:
    import json

    import torch

    from sdserve.constants import DEFAULT_MODEL_DIR
    from sdserve.shapes.controlnet_eval import controlnet_table, evaluate_controlnet
    from sdserve.shapes.evaluate import grid

    if args.threads:
        torch.set_num_threads(args.threads)
    model = args.model or DEFAULT_MODEL_DIR
    try:
        path = resolve_net(args.net, model)
    except FileNotFoundError as exc:
        print(f"sdserve: {exc}", file=sys.stderr)
        return 2
    result = evaluate_controlnet(model, path, n=args.n, scale=args.scale)
    print(f"\n{path}: {result.seconds_per_image:.3f} s/image\n")
    print(controlnet_table(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result.summary(), indent=2) + "\n")
    if args.grid:
        k = min(8, len(result.cases))
        images = (result.images["control"][:k] + [c.silhouette for c in result.cases[:k]]
                  + result.images["none"][:k])  # fmt: skip
        labels = [f"{c.caption.prompt} ({w})" for w in ("ControlNet", "silhouette", "without")
                  for c in result.cases[:k]]  # fmt: skip
        grid(images, labels).save(args.grid)
    return 0


def run_silhouette(args: argparse.Namespace) -> int:
    from sdserve.shapes.controlnet_data import silhouette

    try:
        x, y = (float(v) for v in args.at.split(","))
    except ValueError:
        print(f"sdserve: --at wants X,Y (fractions), not {args.at!r}", file=sys.stderr)
        return 2
    s = args.size
    silhouette(args.shape, x * s, y * s, args.extent * s, s).save(args.out)
    print(f"wrote {args.out}")
    return 0
