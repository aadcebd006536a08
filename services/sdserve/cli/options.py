"""Options several commands share, declared once as argparse parent parsers, and the helpers
that turn them into requests and replies into files."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

EXIT_RPC_ERROR = 2
"""Exit status of a command whose RPC failed (it prints `CODE: message` on stderr)."""


def _parent() -> argparse.ArgumentParser:
    return argparse.ArgumentParser(add_help=False)


class Parents:
    """The parent parsers; `parents.server` etc. go into `add_parser(..., parents=[...])`."""

    def __init__(self):
        self.server = _parent()
        self.server.add_argument(
            "--server", default="127.0.0.1:9000", help="HOST:PORT (default %(default)s)"
        )
        tls = self.server.add_argument_group("TLS (each also from its SDSERVE_TLS_* variable)")
        tls.add_argument(
            "--tls-ca",
            metavar="PEM",
            help="CA certificate of the server's (turns TLS on; $SDSERVE_TLS_CA)",
        )
        tls.add_argument(
            "--tls-cert",
            metavar="PEM",
            help="client certificate, for mutual TLS ($SDSERVE_TLS_CERT)",
        )
        tls.add_argument(
            "--tls-key", metavar="PEM", help="the client certificate's key ($SDSERVE_TLS_KEY)"
        )
        tls.add_argument("--tls", action="store_true",
                         help="TLS with the system's trusted CAs (no --tls-ca needed)")  # fmt: skip
        self.quiet = _parent()
        self.quiet.add_argument("-q", "--quiet", action="store_true", help="no progress output")
        self.request = _request_parent()
        self.output = _parent()
        self.output.add_argument(
            "-o",
            "--output",
            metavar="FILE",
            help="PNG to write; with several images, FILE-0.png, FILE-1.png, ... "
            "(default: sdserve-SEED.png)",
        )

    @staticmethod
    def timeout(default: float, what: str = "RPC deadline") -> argparse.ArgumentParser:
        """--timeout S, whose default differs between commands."""
        parent = _parent()
        parent.add_argument("--timeout", type=float, default=default, metavar="S",
                            help=f"{what} in seconds (default %(default)s)")  # fmt: skip
        return parent


def _request_parent() -> argparse.ArgumentParser:
    """The options of one generation (generate and submit)."""
    parser = _parent()
    parser.add_argument("prompt", help="what the image should show")
    parser.add_argument(
        "--model", metavar="NAME", help="served model (`sdserve models` lists them; default: "
        "the server's first)",
    )  # fmt: skip
    parser.add_argument("--negative-prompt", default="", metavar="TEXT", help="what to avoid")
    parser.add_argument("--seed", type=int, help="seed of the first image (default: random)")
    parser.add_argument("--steps", type=int, help="denoising steps")
    parser.add_argument(
        "--scheduler", metavar="NAME", help="ddpm, ddim, pndm, euler, euler_ancestral or "
        "dpmpp_2m; flow_euler, the only one of sd3 and flux models",
    )  # fmt: skip
    parser.add_argument("--width", type=int, help="pixels, a multiple of 8 (default: the model's)")
    parser.add_argument("--height", type=int, help="pixels, a multiple of 8 (default: the model's)")
    parser.add_argument(
        "--guidance",
        type=float,
        metavar="G",
        help="classifier-free guidance scale (flux: the guidance its transformer embeds)",
    )
    parser.add_argument(
        "--num-images", type=int, metavar="K", help="images to generate (default 1)"
    )
    parser.add_argument(
        "--lora",
        action="append",
        metavar="NAME[:SCALE]",
        help="apply a LoRA adapter of the model (`sdserve loras` lists them), at SCALE "
        "(default 1); repeat for several",
    )
    add_image_options(parser)
    add_control_options(parser)
    add_cheaper_step_options(parser)
    add_transformer_options(parser)
    return parser


def control_spec(text: str):
    """argparse type of --control NAME=IMAGE[:SCALE[:START:END]]: a `client.Control` with the
    image file's bytes (numbers are read from the right, so IMAGE may hold colons)."""
    from sdserve.client import Control

    name, sep, rest = text.partition("=")
    parts = rest.split(":")
    numbers: list[float] = []
    while len(parts) > 1 and len(numbers) < 3 and _is_number(parts[-1]):
        numbers.insert(0, float(parts.pop()))
    if not (sep and name and parts[0]) or len(numbers) == 2:
        raise argparse.ArgumentTypeError(f"{text!r} is not NAME=IMAGE[:SCALE[:START:END]]")
    scale, start, end = (numbers + [None, None, None])[:3]
    return Control(name, image_file(":".join(parts)), scale=scale, start=start, end=end)


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def add_control_options(parser: argparse.ArgumentParser) -> None:
    """--control (repeatable), --control-preprocess and --control-guess-mode (ControlNets)."""
    parser.add_argument(
        "--control",
        action="append",
        type=control_spec,
        metavar="NAME=IMAGE[:SCALE[:START:END]]",
        help="condition on a ControlNet of the model (`sdserve controlnets` lists them) with "
        "this PNG or JPEG control image, at SCALE (default 1) for the fraction START..END of "
        "the steps (default 0..1); repeat for several",
    )
    parser.add_argument(
        "--control-preprocess",
        choices=("canny",),
        help="make every control image from a photo first: canny draws its edges (OpenCV, "
        "thresholds 100 and 200)",
    )
    parser.add_argument(
        "--control-guess-mode",
        action="store_true",
        help="every ControlNet in guess mode (conditions the prompt's row only)",
    )


def controls(args: argparse.Namespace) -> list | None:
    """The `controls` option of --control, --control-preprocess and --control-guess-mode."""
    if not getattr(args, "control", None):
        return None
    from dataclasses import replace

    return [replace(c, preprocess=args.control_preprocess or "",
                    guess_mode=args.control_guess_mode) for c in args.control]  # fmt: skip


def add_number(parser, flag: str, kind: type, metavar: str, help: str, lists: bool) -> None:
    """A number option: one value of `kind`, or with `lists` (the load tester's mix) the
    comma-separated text of several, which the command splits."""
    parser.add_argument(flag, type=str if lists else kind, help=help,
                        metavar=f"{metavar}[,{metavar}...]" if lists else metavar)  # fmt: skip


def add_cheaper_step_options(parser: argparse.ArgumentParser, lists: bool = False) -> None:
    """--guidance-stop and --cache-interval (guidance truncation, DeepCache)."""
    add_number(parser, "--guidance-stop", float, "F", "run classifier-free guidance only for "
               "this fraction of the steps, 0 < F <= 1 (default 1: all; 0.4 saves about 30%% "
               "of the U-Net rows)", lists)  # fmt: skip
    add_number(parser, "--cache-interval", int, "N", "DeepCache: the whole U-Net every N "
               "steps, only its shallow branch in between (default 1: off)", lists)  # fmt: skip


def add_transformer_options(parser: argparse.ArgumentParser, lists: bool = False) -> None:
    """--max-sequence-length, --true-cfg-scale and --shift (sd3 and flux models only)."""
    group = parser.add_argument_group(
        "diffusion transformers", "sd3 and flux models only (`sdserve models` shows the family); "
        "a U-Net model refuses them",
    )  # fmt: skip
    add_number(group, "--max-sequence-length", int, "N", "T5 tokens the prompt is padded or "
               "cut to, 1..512 (default: the pipeline's, 256 for sd3, 512 for flux); it "
               "changes the image", lists)  # fmt: skip
    add_number(group, "--true-cfg-scale", float, "S", "flux only: true classifier-free "
               "guidance with the negative prompt, a second forward per step (default 1: "
               "none; --guidance is flux's distilled guidance)", lists)  # fmt: skip
    add_number(group, "--shift", float, "S", "the flow-matching sigma shift, S > 0 (default: "
               "the model's; sd3: its scheduler config's, flux: from the image size)",
               lists)  # fmt: skip


def image_file(path: str) -> bytes:
    """argparse type: the bytes of an image file."""
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise argparse.ArgumentTypeError(f"cannot read {path}: {exc.strerror}") from exc


def add_image_options(parser: argparse.ArgumentParser, strengths: bool = False) -> None:
    """--init-image, --strength and --mask (image-to-image and inpainting)."""
    parser.add_argument(
        "--init-image",
        type=image_file,
        metavar="IN.png",
        help="image-to-image: start from this PNG or JPEG (its size is the output's)",
    )
    add_number(parser, "--strength", float, "S", "with --init-image: how much to repaint, "
               "0 < S <= 1 (the server's default: 0.8)", strengths)  # fmt: skip
    parser.add_argument(
        "--mask",
        type=image_file,
        metavar="MASK.png",
        help="inpainting: a PNG of the init image's size, white = repaint, black = keep",
    )


def request_options(args: argparse.Namespace) -> dict:
    """The client options (`sdserve.client.OPTIONS`) that the request options describe; unset
    ones are None, so that the server's defaults apply."""
    return dict(
        negative_prompt=args.negative_prompt,
        width=args.width,
        height=args.height,
        steps=args.steps,
        guidance_scale=args.guidance,
        seed=args.seed,
        scheduler=args.scheduler,
        num_images=args.num_images,
        init_image=args.init_image,
        strength=args.strength,
        mask_image=args.mask,
        guidance_stop=args.guidance_stop,
        cache_interval=args.cache_interval,
        model=args.model,
        loras=args.lora,
        controls=controls(args),
        max_sequence_length=args.max_sequence_length,
        true_cfg_scale=args.true_cfg_scale,
        shift=args.shift,
    )


def output_paths(output: str | None, seeds: list[int]) -> list[Path]:
    if output is None:
        return [Path(f"sdserve-{seed}.png") for seed in seeds]
    path = Path(output)
    if len(seeds) == 1:
        return [path]
    return [path.with_name(f"{path.stem}-{i}{path.suffix or '.png'}") for i in range(len(seeds))]


def write_images(result, output: str | None) -> None:
    """Writes a GenerateResult's images as PNG files and says where, and which ones the
    model's safety checker flagged or blocked."""
    paths = output_paths(output, [image.seed for image in result.images])
    for image, path in zip(result.images, paths, strict=True):
        path.parent.mkdir(parents=True, exist_ok=True)
        image.save(path)
        verdict = ("; blocked by the safety checker (black)" if image.blocked
                   else "; flagged by the safety checker" if image.nsfw else "")  # fmt: skip
        print(f"wrote {path} ({image.width}x{image.height}, seed {image.seed}{verdict})")


def client(args: argparse.Namespace, timeout: float | None = None):
    """The blocking Client for `--server` and the TLS options (`Parents.server`)."""
    from sdserve.client import Client

    return Client(args.server, timeout=args.timeout if timeout is None else timeout,
                  **_tls_options(args))  # fmt: skip


def channel_credentials(args: argparse.Namespace):
    """TLS credentials from the TLS options and their variables (None: plaintext)."""
    from sdserve.client import channel_credentials

    return channel_credentials(**_tls_options(args))


def _tls_options(args: argparse.Namespace) -> dict:
    return dict(tls=args.tls or None, tls_ca=args.tls_ca, tls_cert=args.tls_cert,
                tls_key=args.tls_key)  # fmt: skip


def call_metadata() -> tuple[tuple[str, str], ...] | None:
    """The gRPC metadata of every call: `authorization: Bearer $SDSERVE_API_KEY` when set (the
    key is never a flag: flags show in `ps`)."""
    from sdserve.client._calls import call_metadata

    return call_metadata()


def rpc_error(exc) -> int:
    """Prints a ClientError as `CODE: message` on stderr; returns EXIT_RPC_ERROR."""
    print(exc, file=sys.stderr)
    return EXIT_RPC_ERROR


def progress_bars(descriptions: dict[str, str] | None = None):
    """A `progress(phase, step, total, loss)` callback that shows a tqdm bar per phase."""
    from tqdm import tqdm

    bars: dict[str, tqdm] = {}

    def progress(phase: str, step: int, total: int, loss: float) -> None:
        if phase not in bars:
            desc = (descriptions or {}).get(phase, f"training the {phase}")
            bars[phase] = tqdm(total=total, desc=desc, unit="step")
        bar = bars[phase]
        bar.update(step - bar.n)
        if loss:
            bar.set_postfix(loss=f"{loss:.4f}", refresh=False)
        if step == total:
            bar.close()

    return progress


def require_extra(module: str, extra: str, what: str) -> None:
    """Exits, before any work, with the command that installs `module` (it comes with sdserve's
    `extra`, pyproject.toml) when it is missing; `what` names the command or option needing it."""
    import importlib.util

    if importlib.util.find_spec(module) is None:
        raise SystemExit(f"{what} needs {module}, which comes with the {extra} extra: "
                         f"pip install 'sdserve[{extra}]'")  # fmt: skip
