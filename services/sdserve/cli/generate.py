"""`sdserve generate`: images through a running server, with a progress bar.

It calls the server through `sdserve.client` (grpc and the generated messages only), imported
when the command runs, so it starts fast; it does no validation of its own: what the server
answers is what the user sees.
"""

from __future__ import annotations

import argparse
import sys
import time

from sdserve.cli import options
from sdserve.cli.options import Parents


def register(sub, parents: Parents) -> None:
    gen = sub.add_parser(
        "generate",
        help="generate images through a running server",
        description="Call DiffusionService.GenerateStream and write the images as PNGs. Unset "
        "options take the server's defaults. On a gRPC error, print CODE: message and exit "
        "with 2. Ctrl-C cancels the request on the server too.",
        parents=[
            parents.request,
            parents.server,
            parents.output,
            parents.timeout(600.0),
            parents.quiet,
        ],  # fmt: skip
    )
    gen.set_defaults(func=run)
    models = sub.add_parser(
        "models",
        help="list the models a running server serves",
        description="Call DiffusionService.ListModels and print each served model: its name "
        "(what --model takes), family, native size, prediction type, default sampler, and how "
        "its stages compute (device, dtype, the Denoiser's torch.compile mode). The first is "
        "the default.",
        parents=[parents.server, parents.timeout(30.0)],
    )
    models.add_argument("--json", action="store_true", help="print JSON instead of a table")
    models.set_defaults(func=list_models)
    loras = sub.add_parser(
        "loras",
        help="list a served model's LoRA adapters",
        description="Call DiffusionService.ListLoras and print the adapters in a model's adapter "
        "folder (what --lora takes), their file sizes and whether they are loaded.",
        parents=[parents.server, parents.timeout(30.0)],
    )
    loras.add_argument("--model", default="", help="served model (default: the default one)")
    loras.set_defaults(func=list_loras)
    nets = sub.add_parser(
        "controlnets",
        help="list a served model's ControlNets",
        description="Call DiffusionService.ListControlNets and print the ControlNets in a "
        "model's ControlNet folder (what --control takes), their sizes, whether they are "
        "loaded, and why one cannot condition the model.",
        parents=[parents.server, parents.timeout(30.0)],
    )
    nets.add_argument("--model", default="", help="served model (default: the default one)")
    nets.set_defaults(func=list_controlnets)


def list_loras(args: argparse.Namespace) -> int:
    return _list_files(args, "loras", "no LoRA adapters (put NAME.safetensors files or NAME/ "
                       "folders in the model's loras/ folder, or set its lora_dir)")  # fmt: skip


def list_controlnets(args: argparse.Namespace) -> int:
    return _list_files(args, "controlnets", "no ControlNets (put diffusers ControlNetModel "
                       "folders in the model's controlnets/ folder, or set its "
                       "controlnet_dir)")  # fmt: skip


def _list_files(args: argparse.Namespace, method: str, none: str) -> int:
    """Prints what `client.<method>(model)` lists (LoRA adapters or ControlNets): a line each
    with its size, whether it is loaded, and why it cannot be used, if it cannot."""
    from sdserve.client import ClientError

    try:
        with options.client(args) as client:
            files = getattr(client, method)(args.model)
    except ClientError as exc:
        return options.rpc_error(exc)
    if not files:
        print(none)
    for f in files:
        state = "loaded" if f.loaded else "on disk"
        misfit = getattr(f, "misfit", "")
        fits = f"  NOT USABLE: {misfit}" if misfit else ""
        print(f"{f.name:<24} {f.file_bytes / 2**20:8.1f} MB  {state}  ({f.model}){fits}")
    return 0


def list_models(args: argparse.Namespace) -> int:
    import json
    from dataclasses import asdict

    from sdserve.client import ClientError

    try:
        with options.client(args) as client:
            models = client.models()
    except ClientError as exc:
        return options.rpc_error(exc)
    if args.json:
        print(json.dumps([_camel_case(asdict(m)) for m in models], indent=2))
        return 0
    rows = [("NAME", "FAMILY", "SIZE", "PREDICTION", "SAMPLER", "INPUTS", "DEVICE", "DTYPE",
             "COMPILE")]  # fmt: skip
    for i, m in enumerate(models):
        inputs = "inpaint" if m.inpainting else "text+image" if m.image_inputs else "text"
        rows.append((m.name + (" (default)" if i == 0 else ""), m.family,
                     f"{m.native_width}x{m.native_height}", m.prediction_type,
                     m.default_scheduler, inputs, *_stage_columns(m.stages)))  # fmt: skip
    widths = [max(len(row[c]) for row in rows) for c in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())
    return 0


def _stage_columns(stages) -> tuple[str, str, str]:
    """(device, dtype, compile) of a model's stages: one value when they agree, else each
    stage's ("denoiser=bfloat16 vae_decoder=float32 ..."); compile is the Denoiser's."""

    def column(attr: str) -> str:
        values = [getattr(s, attr) for s in stages]
        if len(set(values)) <= 1:
            return values[0] if values else "?"
        return " ".join(f"{s.stage}={v}" for s, v in zip(stages, values, strict=True))

    denoiser = [s.compile for s in stages if s.stage == "denoiser"]
    return column("device"), column("dtype"), denoiser[0] if denoiser else "?"


def _camel_case(fields: dict) -> dict:
    """Keys as protobuf's JSON mapping writes them (native_width: nativeWidth)."""
    return {k.split("_")[0] + "".join(w.title() for w in k.split("_")[1:]): v
            for k, v in fields.items()}  # fmt: skip


def follow(events, quiet: bool = False):
    """Consumes a `Client.stream`, drawing a progress bar; returns its GenerateResult. Closes
    the stream however it ends, which cancels the request on the server if it has not ended."""
    from contextlib import closing

    from tqdm import tqdm

    from sdserve.client import GenerateResult, Progress, Queued

    bar = tqdm(desc="queued", unit="step", disable=True if quiet else None, leave=False)
    with closing(events), closing(bar):
        for event in events:
            if isinstance(event, Queued):
                bar.set_description(f"queued (position {event.position})")
            elif isinstance(event, Progress):
                bar.total = event.total
                bar.set_description("denoising")
                bar.update(event.step - bar.n)
            elif isinstance(event, GenerateResult):
                return event
    raise RuntimeError("the server ended the stream without a result")


def run(args: argparse.Namespace) -> int:
    from sdserve.client import ClientError

    started = time.perf_counter()
    try:
        with options.client(args) as client:
            result = follow(client.stream(args.prompt, **options.request_options(args)),
                            quiet=args.quiet)  # fmt: skip
    except ClientError as exc:
        return options.rpc_error(exc)
    except KeyboardInterrupt:  # follow closed the stream: the request's batch slot is freed
        print("cancelled", file=sys.stderr)
        return 130
    elapsed = time.perf_counter() - started

    options.write_images(result, args.output)
    p, t = result.parameters, result.timings
    steps = f"{p.steps} steps"
    if p.strength:  # image-to-image: diffusers runs the last int(steps * strength)
        run = int(p.steps * round(p.strength, 6))
        steps = f"{run} of {p.steps} steps (strength {p.strength:g})"
    encoded = f"image {t.vae_encoder_s:.2f}s, " if p.strength else ""
    model = f"{p.model}: " if p.model else ""
    print(
        f"{model}{steps} of {p.scheduler}, guidance {p.guidance_scale:g}{_transformer(p)}: "
        f"{elapsed:.2f}s "
        f"(text {t.text_encoder_s:.2f}s, {encoded}denoise {t.denoiser_s:.2f}s, "
        f"vae {t.vae_decoder_s:.2f}s)"
    )
    return 0


def _transformer(p) -> str:
    """A diffusion transformer's settings, as the summary line shows them ("" for a U-Net)."""
    parts = [f"T5 {p.max_sequence_length} tokens"] if p.max_sequence_length else []
    if p.true_cfg_scale != 1:
        parts.append(f"true CFG {p.true_cfg_scale:g}")
    if p.shift:
        parts.append(f"shift {p.shift:g}")
    return "".join(f", {part}" for part in parts)
