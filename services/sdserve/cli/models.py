"""`sdserve make-tiny-model`: a random-weight model in the diffusers folder layout (tests)."""

from __future__ import annotations

import argparse
import time

from sdserve.cli.options import Parents


def register(sub, parents: Parents) -> None:
    tiny = sub.add_parser(
        "make-tiny-model",
        help="write a tiny random-weight model (for tests)",
        description="Write a tiny random-weight Stable Diffusion in the diffusers folder layout. "
        "The same seed gives the same weights.",
    )
    tiny.add_argument("dir", help="folder to create (must not exist, or be empty)")
    tiny.add_argument("--seed", type=int, default=0, help="weights seed (default %(default)s)")
    archs = ("tiny", "tiny-sd15-layout", "tiny-inpaint", "tiny-sd2", "tiny-sdxl", "tiny-sd3",
             "tiny-flux")  # fmt: skip
    tiny.add_argument(
        "--arch",
        default="tiny",
        choices=archs,
        help="layout: tiny (2 levels, default), tiny-sd15-layout (SD 1.5's 4 levels at a "
        "narrow width), tiny-inpaint (tiny with a 9-channel inpainting U-Net), tiny-sd2 (SD "
        "2.x's shape, v-prediction), tiny-sdxl (SDXL's shape: two text encoders, a "
        "StableDiffusionXLPipeline folder), tiny-sd3 (SD 3.5's MMDiT: two CLIP encoders and "
        "T5, a StableDiffusion3Pipeline folder) or tiny-flux (FLUX.1-dev's shape: CLIP and "
        "T5, a FluxPipeline folder)",
    )
    tiny.add_argument(
        "--safety-checker",
        action="store_true",
        help="also write a tiny random safety checker (safety_checker/ and feature_extractor/) "
        "that flags a red square on black and diagonal stripes, and passes a white image and a "
        "grey ramp (sdserve.testing.safety_checkers)",
    )
    tiny.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from sdserve.testing.tiny import make_tiny_model

    started = time.perf_counter()
    out = make_tiny_model(args.dir, seed=args.seed, arch=args.arch,
                          safety_checker=args.safety_checker)  # fmt: skip
    print(f"wrote a tiny random-weight model to {out} in {time.perf_counter() - started:.1f}s")
    return 0
