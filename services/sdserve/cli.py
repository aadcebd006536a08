"""The `sdserve` command: serve | generate | submit | job | loadtest | make-tiny-model |
train-default-model.

`generate` imports only grpc and the generated messages, so it starts fast; it does no
validation of its own: what the server answers is what the user sees.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

EXIT_RPC_ERROR = 2


def _cmd_serve(args: argparse.Namespace) -> int:
    from sdserve.config import load_config
    from sdserve.server import serve_forever

    config = load_config(
        args.config,
        overrides={
            ("model", "path"): args.model,
            ("server", "grpc_port"): args.grpc_port,
            ("server", "http_port"): args.http_port,
            ("server", "ray_address"): args.address,
            ("server", "host"): args.host,
            ("jobs", "redis_url"): args.redis_url,
            ("metrics", "export_port"): args.metrics_port,
        },
    )
    serve_forever(config)
    return 0


def _output_paths(output: str | None, seeds: list[int]) -> list[Path]:
    if output is None:
        return [Path(f"sdserve-{seed}.png") for seed in seeds]
    path = Path(output)
    if len(seeds) == 1:
        return [path]
    return [path.with_name(f"{path.stem}-{i}{path.suffix or '.png'}") for i in range(len(seeds))]


def _follow(call, quiet: bool = False):
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


def _generate_request(args: argparse.Namespace):
    """The GenerateRequest that `generate`'s and `submit`'s options describe."""
    from sdserve.v1 import diffusion_pb2

    request = diffusion_pb2.GenerateRequest(
        prompt=args.prompt,
        negative_prompt=args.negative_prompt,
        scheduler=args.scheduler or "",
    )
    for field in ("width", "height", "steps", "seed", "num_images"):
        if getattr(args, field) is not None:
            setattr(request, field, getattr(args, field))
    if args.guidance is not None:
        request.guidance_scale = args.guidance
    return request


def _write_images(reply, output: str | None) -> None:
    paths = _output_paths(output, [image.seed for image in reply.images])
    for image, path in zip(reply.images, paths, strict=True):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(image.png)
        print(f"wrote {path} ({image.width}x{image.height}, seed {image.seed})")


def _cmd_generate(args: argparse.Namespace) -> int:
    import grpc

    from sdserve.v1 import diffusion_pb2_grpc

    request = _generate_request(args)

    started = time.perf_counter()
    with grpc.insecure_channel(args.server) as channel:
        stub = diffusion_pb2_grpc.DiffusionServiceStub(channel)
        call = stub.GenerateStream(request, timeout=args.timeout)
        try:
            reply = _follow(call, quiet=args.quiet)
        except grpc.RpcError as exc:
            print(f"{exc.code().name}: {exc.details()}", file=sys.stderr)
            return EXIT_RPC_ERROR
        except KeyboardInterrupt:
            call.cancel()  # frees the request's batch slot on the server
            print("cancelled", file=sys.stderr)
            return 130
    elapsed = time.perf_counter() - started

    _write_images(reply, args.output)
    p, t = reply.parameters, reply.timings
    print(
        f"{p.steps} steps of {p.scheduler}, guidance {p.guidance_scale:g}: {elapsed:.2f}s "
        f"(text {t.text_encoder_s:.2f}s, denoise {t.denoiser_s:.2f}s, vae {t.vae_decoder_s:.2f}s)"
    )
    return 0


def _rpc_error(exc) -> int:
    print(f"{exc.code().name}: {exc.details()}", file=sys.stderr)
    return EXIT_RPC_ERROR


def _cmd_submit(args: argparse.Namespace) -> int:
    import grpc

    from sdserve.v1 import diffusion_pb2, diffusion_pb2_grpc

    submit = diffusion_pb2.SubmitJobRequest(
        request=_generate_request(args),
        idempotency_key=args.idempotency_key or "",
        priority=diffusion_pb2.JobPriority.Value(f"JOB_PRIORITY_{args.priority.upper()}"),
    )
    with grpc.insecure_channel(args.server) as channel:
        try:
            reply = diffusion_pb2_grpc.DiffusionServiceStub(channel).SubmitJob(
                submit, timeout=args.timeout
            )
        except grpc.RpcError as exc:
            return _rpc_error(exc)
    print(reply.job_id)
    if not reply.created:
        print("(an existing job: same idempotency key)", file=sys.stderr)
    return 0


def _describe_job(job) -> str:
    from sdserve.v1 import diffusion_pb2

    state = diffusion_pb2.JobState.Name(job.state).removeprefix("JOB_STATE_")
    parts = [f"{job.job_id}: {state}"]
    if state == "RUNNING":
        parts.append(f"step {job.step}/{job.total_steps}")
    parts.append(f"attempts {job.attempts}")
    if job.finished_at:
        parts.append(f"took {job.finished_at - job.created_at:.1f}s from submission")
    elif job.created_at:
        parts.append(f"submitted {time.time() - job.created_at:.1f}s ago")
    if job.cancel_requested and state == "RUNNING":
        parts.append("cancel requested")
    line = ", ".join(parts)
    return f"{line}\n  error: {job.error}" if job.error else line


def _cmd_job(args: argparse.Namespace) -> int:
    import grpc
    from tqdm import tqdm

    from sdserve.v1 import diffusion_pb2, diffusion_pb2_grpc

    request = diffusion_pb2.GetJobRequest(job_id=args.job_id)
    with grpc.insecure_channel(args.server) as channel:
        stub = diffusion_pb2_grpc.DiffusionServiceStub(channel)
        try:
            if args.cancel:
                job = stub.CancelJob(request, timeout=30)
            elif not args.wait:
                job = stub.GetJob(request, timeout=30)
            else:
                call = stub.WatchJob(request, timeout=args.timeout)
                bar = tqdm(desc="queued", unit="step", disable=True if args.quiet else None,
                           leave=False)  # fmt: skip
                try:
                    for job in call:
                        state = diffusion_pb2.JobState.Name(job.state).removeprefix("JOB_STATE_")
                        bar.set_description(state.lower())
                        if job.total_steps:
                            bar.total = job.total_steps
                        bar.update(job.step - bar.n)
                except KeyboardInterrupt:
                    call.cancel()  # stops watching; the job goes on (cancel it with --cancel)
                    print(f"stopped watching; the job goes on: {args.job_id}", file=sys.stderr)
                    return 130
                finally:
                    bar.close()
        except grpc.RpcError as exc:
            return _rpc_error(exc)
    print(_describe_job(job))
    if job.HasField("result") and (args.wait or args.output):
        _write_images(job.result, args.output)
    return 0 if job.state != diffusion_pb2.JOB_STATE_FAILED else 1


def _cmd_loadtest(args: argparse.Namespace) -> int:
    from sdserve import loadtest

    return loadtest.main(args)


def _cmd_make_tiny_model(args: argparse.Namespace) -> int:
    from sdserve.testing.tiny import make_tiny_model

    started = time.perf_counter()
    out = make_tiny_model(args.dir, seed=args.seed, arch=args.arch)
    print(f"wrote a tiny random-weight model to {out} in {time.perf_counter() - started:.1f}s")
    return 0


def _add_request_options(parser: argparse.ArgumentParser) -> None:
    """The options of one generation (generate and submit)."""
    parser.add_argument("prompt", help="what the image should show")
    parser.add_argument(
        "--server", default="127.0.0.1:9000", help="HOST:PORT (default %(default)s)"
    )
    parser.add_argument("--negative-prompt", default="", metavar="TEXT", help="what to avoid")
    parser.add_argument("--seed", type=int, help="seed of the first image (default: random)")
    parser.add_argument("--steps", type=int, help="denoising steps")
    parser.add_argument(
        "--scheduler", metavar="NAME", help="ddpm, ddim, pndm, euler, euler_ancestral or dpmpp_2m"
    )
    parser.add_argument("--width", type=int, help="pixels, a multiple of 8 (default: the model's)")
    parser.add_argument("--height", type=int, help="pixels, a multiple of 8 (default: the model's)")
    parser.add_argument(
        "--guidance", type=float, metavar="G", help="classifier-free guidance scale"
    )
    parser.add_argument(
        "--num-images", type=int, metavar="K", help="images to generate (default 1)"
    )


def _add_output_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "-o",
        "--output",
        metavar="FILE",
        help="PNG to write; with several images, FILE-0.png, FILE-1.png, ... "
        "(default: sdserve-SEED.png)",
    )


def _cmd_train_default_model(args: argparse.Namespace) -> int:
    import json

    from tqdm import tqdm

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
    bars: dict[str, tqdm] = {}

    def progress(phase: str, step: int, total: int, loss: float) -> None:
        if phase not in bars:
            bars[phase] = tqdm(total=total, desc=f"training the {phase}", unit="step")
        bar = bars[phase]
        bar.update(step - bar.n)
        bar.set_postfix(loss=f"{loss:.4f}", refresh=False)
        if step == total:
            bar.close()

    report = train(out, config, progress)
    print(json.dumps(report, indent=2))
    print(f"wrote {out} in {time.perf_counter() - started:.0f}s")
    return 0


def _parse_runs(text: str) -> list[tuple[str, int]]:
    from sdserve.constants import SCHEDULER_NAMES

    runs = []
    for item in text.split(","):
        sampler, _, steps = item.strip().partition(":")
        if sampler not in SCHEDULER_NAMES or not steps.isdigit() or int(steps) < 1:
            raise argparse.ArgumentTypeError(
                f"{item!r}: expected SAMPLER:STEPS with SAMPLER one of {', '.join(SCHEDULER_NAMES)}"
            )
        runs.append((sampler, int(steps)))
    return runs


def _cmd_eval_default_model(args: argparse.Namespace) -> int:
    import json
    from dataclasses import asdict

    from tqdm import tqdm

    from sdserve.constants import DEFAULT_MODEL_DIR
    from sdserve.shapes.adherence import ShapeClassifier
    from sdserve.shapes.evaluate import eval_captions, grid, load_pipeline, measure, table

    _torch_threads(args.threads)
    pipe = load_pipeline(args.model or DEFAULT_MODEL_DIR)
    shapes = ShapeClassifier.fit()
    captions = eval_captions(args.n)
    results = []
    for sampler, steps in tqdm(args.runs, desc="evaluating", unit="run"):
        result, images = measure(pipe, captions, sampler=sampler, steps=steps,
                                 guidance=args.guidance, shapes=shapes)  # fmt: skip
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


def _torch_threads(n: int | None) -> None:
    import torch

    if n:
        torch.set_num_threads(n)


def _cmd_check_image(args: argparse.Namespace) -> int:
    from PIL import Image

    from sdserve.shapes.adherence import ShapeClassifier, background_color, foreground_color
    from sdserve.shapes.synthetic import parse_prompt

    caption = parse_prompt(args.prompt)
    if caption is None:
        grammar = "a [small|large] COLOR SHAPE on a COLOR background"
        print(f"{args.prompt!r} is not in the default model's grammar ({grammar!r}); "
              "nothing to check")  # fmt: skip
        return 0
    image = Image.open(args.image)
    checks = [
        ("foreground color", caption.color, foreground_color(image)),
        ("background color", caption.background, background_color(image)),
        ("shape", caption.shape, ShapeClassifier.fit().predict(image)),
    ]
    for what, wanted, seen in checks:
        print(f"  {what}: {seen} " + ("(as prompted)" if seen == wanted else f"(prompt: {wanted})"))
    return 0 if all(wanted == seen for _, wanted, seen in checks) else 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sdserve",
        description="Stable Diffusion as Ray Serve microservices behind a gRPC API.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = sub.add_parser(
        "serve",
        help="start Ray and the sdserve application, serve until Ctrl-C",
        description="Start (or join) a Ray cluster, deploy the TextEncoder, Denoiser, VaeDecoder "
        "and Pipeline deployments, and serve DiffusionService over gRPC until SIGINT/SIGTERM.",
    )
    serve.add_argument(
        "--model",
        metavar="DIR",
        help="diffusers-format model folder (default: the built-in model, trained on synthetic "
        "shapes: try 'a red circle on a blue background')",
    )
    serve.add_argument(
        "--grpc-port", type=int, metavar="PORT", help="public gRPC port (default 9000)"
    )
    serve.add_argument(
        "--http-port",
        type=int,
        metavar="PORT",
        help="port of Serve's HTTP proxy, unused by sdserve (default 8000)",
    )
    serve.add_argument("--host", help="address of the local Ray node (default 127.0.0.1)")
    serve.add_argument(
        "--address",
        metavar="ADDR",
        help="join an existing Ray cluster (ray://HOST:10001 or auto) instead of "
        "starting a local one",
    )
    serve.add_argument(
        "--redis-url",
        metavar="URL",
        help="Redis for the job queue: redis://[:PASSWORD@]HOST:PORT/DB or rediss:// for TLS "
        "(default redis://127.0.0.1:6379/0). Without it Generate still serves; the job RPCs "
        "answer UNAVAILABLE",
    )
    serve.add_argument(
        "--metrics-port",
        type=int,
        metavar="PORT",
        help="port of the local Ray node's Prometheus endpoint, with sdserve's and Ray Serve's "
        "metrics (default 8080; start-up prints the URL to scrape)",
    )
    serve.add_argument(
        "--config", metavar="FILE", help="YAML config file (see deploy/sdserve.yaml)"
    )
    serve.set_defaults(func=_cmd_serve)

    gen = sub.add_parser(
        "generate",
        help="generate images through a running server",
        description="Call DiffusionService.Generate and write the images as PNGs. Unset options "
        "take the server's defaults. On a gRPC error, print CODE: message and exit with 2.",
    )
    _add_request_options(gen)
    _add_output_option(gen)
    gen.add_argument(
        "--timeout",
        type=float,
        default=600.0,
        metavar="S",
        help="RPC deadline in seconds (default %(default)s)",
    )
    gen.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    gen.set_defaults(func=_cmd_generate)

    submit = sub.add_parser(
        "submit",
        help="queue an asynchronous job and print its id",
        description="Call DiffusionService.SubmitJob: the job is kept in Redis and runs on a "
        "JobWorker, even if the server restarts. Follow it with `sdserve job ID --wait`.",
    )
    _add_request_options(submit)
    submit.add_argument(
        "--priority",
        default="normal",
        choices=["high", "normal", "low"],
        help="workers take higher priorities first (default %(default)s)",
    )
    submit.add_argument(
        "--idempotency-key",
        metavar="KEY",
        help="submitting again with the same key returns the first job instead of a new one",
    )
    submit.add_argument(
        "--timeout", type=float, default=30.0, metavar="S", help="RPC deadline (default 30)"
    )
    submit.set_defaults(func=_cmd_submit)

    job = sub.add_parser(
        "job",
        help="show, wait for or cancel an asynchronous job",
        description="Show a job's state (GetJob); with --wait follow it with a progress bar "
        "(WatchJob) and write its images; with --cancel cancel it (CancelJob). Exit status: 0, "
        "or 1 when the job FAILED, 2 on a gRPC error.",
    )
    job.add_argument("job_id", metavar="ID", help="the id `sdserve submit` printed")
    job.add_argument("--server", default="127.0.0.1:9000", help="HOST:PORT (default %(default)s)")
    what = job.add_mutually_exclusive_group()
    what.add_argument("--wait", action="store_true", help="follow the job until it ends")
    what.add_argument("--cancel", action="store_true", help="cancel the job")
    _add_output_option(job)
    job.add_argument(
        "--timeout",
        type=float,
        default=3600.0,
        metavar="S",
        help="how long --wait waits (default %(default)s)",
    )
    job.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    job.set_defaults(func=_cmd_job)

    load = sub.add_parser(
        "loadtest",
        help="send bounded gRPC load to a server and report images/s and latency",
        description="Closed loop (--concurrency C) or open loop (--rate R, Poisson arrivals) "
        "against DiffusionService.Generate, bounded by --requests and/or --duration (default: "
        "50 requests). Request options take comma-separated lists, which make a mix.",
    )
    load.add_argument("--server", default="127.0.0.1:9000", help="HOST:PORT (default %(default)s)")
    loop = load.add_mutually_exclusive_group()
    loop.add_argument(
        "--concurrency",
        type=int,
        default=1,
        metavar="C",
        help="closed loop with C clients (default %(default)s)",
    )
    loop.add_argument("--rate", type=float, metavar="R", help="open loop, R requests/s on average")
    load.add_argument("--requests", type=int, metavar="N", help="stop after N requests")
    load.add_argument("--duration", type=float, metavar="S", help="stop issuing after S seconds")
    load.add_argument(
        "--prompt", action="append", metavar="TEXT", help="a prompt (repeat for a mix)"
    )
    load.add_argument("--steps", metavar="N[,N...]", help="denoising steps")
    load.add_argument("--scheduler", metavar="NAME[,NAME...]", help="sampler(s)")
    load.add_argument("--width", metavar="W[,W...]", help="width(s) in pixels")
    load.add_argument("--height", metavar="H[,H...]", help="height(s) in pixels")
    load.add_argument("--guidance", metavar="G[,G...]", help="guidance scale(s)")
    load.add_argument(
        "--timeout",
        type=float,
        default=600.0,
        metavar="S",
        help="per-request deadline (default %(default)s)",
    )
    load.add_argument("--out", metavar="FILE.json", help="write the full report (every request)")
    load.add_argument("-q", "--quiet", action="store_true", help="no live progress line")
    load.set_defaults(func=_cmd_loadtest)

    tiny = sub.add_parser(
        "make-tiny-model",
        help="write a tiny random-weight model (for tests)",
        description="Write a tiny random-weight Stable Diffusion in the diffusers folder layout. "
        "The same seed gives the same weights.",
    )
    tiny.add_argument("dir", help="folder to create (must not exist, or be empty)")
    tiny.add_argument("--seed", type=int, default=0, help="weights seed (default %(default)s)")
    tiny.add_argument(
        "--arch",
        default="tiny",
        choices=["tiny", "tiny-sd15-layout"],
        help="U-Net layout: tiny (2 levels, default) or SD 1.5's 4-level layout at a narrow width",
    )
    tiny.set_defaults(func=_cmd_make_tiny_model)

    train = sub.add_parser(
        "train-default-model",
        help="train the built-in default model on synthetic shapes (about an hour on 2 CPUs)",
        description="Write the default model's architecture with fresh weights, then train its "
        "VAE, and its CLIP text encoder and U-Net together, on seeded synthetic images of one "
        "colored shape on a plain background ('a small red circle on a blue background'). "
        "Writes a diffusers folder with fp16 weights and training.json. Runs on the CPU, "
        "with a progress bar and the loss.",
    )
    from sdserve.shapes.recipe import DEFAULT_GUIDANCE, DEFAULT_RUNS, TrainConfig

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
    train.set_defaults(func=_cmd_train_default_model)

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
    evaluate.add_argument("-n", type=int, default=96, help="prompts (default %(default)s)")
    evaluate.add_argument("--guidance", type=float, default=DEFAULT_GUIDANCE,
                          help="classifier-free guidance scale (default %(default)s)")  # fmt: skip
    evaluate.add_argument(
        "--runs",
        type=_parse_runs,
        default=list(DEFAULT_RUNS),
        metavar="SAMPLER:STEPS,...",
        help="default " + ",".join(f"{s}:{n}" for s, n in DEFAULT_RUNS),
    )
    evaluate.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    evaluate.add_argument(
        "--grid", metavar="PNG", help="write the first run's first 16 images, with their prompts"
    )
    evaluate.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    evaluate.set_defaults(func=_cmd_eval_default_model)

    check = sub.add_parser(
        "check-image",
        help="check an image against a prompt of the default model's grammar",
        description="Print the image's foreground color, background color and shape, as the "
        "model-independent checker of `eval-default-model` sees them, next to the prompt's. "
        "Exits with 1 when one differs.",
    )
    check.add_argument("image", help="PNG file")
    check.add_argument("prompt", help="e.g. 'a red circle on a blue background'")
    check.set_defaults(func=_cmd_check_image)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
