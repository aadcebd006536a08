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
    print(
        f"{steps} of {p.scheduler}, guidance {p.guidance_scale:g}: {elapsed:.2f}s "
        f"(text {t.text_encoder_s:.2f}s, {encoded}denoise {t.denoiser_s:.2f}s, "
        f"vae {t.vae_decoder_s:.2f}s)"
    )
    return 0
