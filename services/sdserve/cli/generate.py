"""`sdserve generate`: images through a running server, with a progress bar.

It imports only grpc and the generated messages, so it starts fast; it does no validation of
its own: what the server answers is what the user sees.
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
        "(what --model takes), family, native size, prediction type and default sampler. The "
        "first is the default.",
        parents=[parents.server, parents.timeout(30.0)],
    )
    models.add_argument("--json", action="store_true", help="print JSON instead of a table")
    models.set_defaults(func=list_models)


def list_models(args: argparse.Namespace) -> int:
    import json

    import grpc
    from google.protobuf.json_format import MessageToDict

    from sdserve.v1 import diffusion_pb2, diffusion_pb2_grpc

    with grpc.insecure_channel(args.server) as channel:
        stub = diffusion_pb2_grpc.DiffusionServiceStub(channel)
        try:
            reply = stub.ListModels(diffusion_pb2.ListModelsRequest(), timeout=args.timeout,
                                    metadata=options.call_metadata())  # fmt: skip
        except grpc.RpcError as exc:
            return options.rpc_error(exc)
    if args.json:
        print(json.dumps(MessageToDict(reply, always_print_fields_with_no_presence=True)["models"],
                         indent=2))  # fmt: skip
        return 0
    rows = [("NAME", "FAMILY", "SIZE", "PREDICTION", "SAMPLER", "INPUTS")]
    for i, m in enumerate(reply.models):
        inputs = "inpaint" if m.inpainting else "text+image" if m.image_inputs else "text"
        rows.append((m.name + (" (default)" if i == 0 else ""), m.family,
                     f"{m.native_width}x{m.native_height}", m.prediction_type,
                     m.default_scheduler, inputs))  # fmt: skip
    widths = [max(len(row[c]) for row in rows) for c in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())
    return 0


def follow(call, quiet: bool = False):
    """Consumes a GenerateStream call, drawing a progress bar; returns its GenerateResponse."""
    from tqdm import tqdm

    bar = tqdm(desc="queued", unit="step", disable=True if quiet else None, leave=False)
    try:
        for event in call:
            kind = event.WhichOneof("event")
            if kind == "queued":
                bar.set_description(f"queued (position {event.queued.position})")
            elif kind == "progress":
                bar.total = event.progress.total
                bar.set_description("denoising")
                bar.update(event.progress.step - bar.n)
            elif kind == "result":
                return event.result
    finally:
        bar.close()
    raise RuntimeError("the server ended the stream without a result")


def run(args: argparse.Namespace) -> int:
    import grpc

    from sdserve.v1 import diffusion_pb2_grpc

    request = options.generate_request(args)
    started = time.perf_counter()
    with grpc.insecure_channel(args.server) as channel:
        stub = diffusion_pb2_grpc.DiffusionServiceStub(channel)
        call = stub.GenerateStream(request, timeout=args.timeout, metadata=options.call_metadata())
        try:
            reply = follow(call, quiet=args.quiet)
        except grpc.RpcError as exc:
            return options.rpc_error(exc)
        except KeyboardInterrupt:
            call.cancel()  # frees the request's batch slot on the server
            print("cancelled", file=sys.stderr)
            return 130
    elapsed = time.perf_counter() - started

    options.write_images(reply, args.output)
    p, t = reply.parameters, reply.timings
    steps = f"{p.steps} steps"
    if p.strength:  # image-to-image: diffusers runs the last int(steps * strength)
        run = int(p.steps * round(p.strength, 6))
        steps = f"{run} of {p.steps} steps (strength {p.strength:g})"
    encoded = f"image {t.vae_encoder_s:.2f}s, " if p.strength else ""
    model = f"{p.model}: " if p.model else ""
    print(
        f"{model}{steps} of {p.scheduler}, guidance {p.guidance_scale:g}: {elapsed:.2f}s "
        f"(text {t.text_encoder_s:.2f}s, {encoded}denoise {t.denoiser_s:.2f}s, "
        f"vae {t.vae_decoder_s:.2f}s)"
    )
    return 0
