"""A tiny random-weight Stable Diffusion written as a diffusers folder (`sdserve make-tiny-model`).

The parts have SD 1.x's architecture at a fraction of its width (`architectures.ARCHS`): a CLIP
text encoder with a byte-level BPE tokenizer, a UNet2DConditionModel with cross-attention
down/up blocks, an AutoencoderKL with four blocks (so latents are 8x smaller per side, as in SD)
and SD 1.5's PNDM scheduler config. `diffusers.StableDiffusionPipeline.from_pretrained(folder)`
loads it. It makes noise, not pictures, but it exercises every code path in a few milliseconds
per step on a CPU. The same seed gives byte-identical weight files.

`tiny-sd2` has SD 2.x's shape and SD 2.1's v-prediction scheduler config; `tiny-sdxl` is an
SDXL folder (`tokenizer_2/`, `text_encoder_2/`, SDXL's Euler scheduler config) that
`diffusers.StableDiffusionXLPipeline.from_pretrained(folder)` loads.

`tiny-sd3` and `tiny-flux` are diffusion transformers in SD 3.5's and FLUX.1's layouts
(`dit_models`), folders that `diffusers.StableDiffusion3Pipeline` and `diffusers.FluxPipeline`
load.

With `safety_checker=True` (`--safety-checker`) the folder also holds a tiny random safety
checker (`safety_checkers`) that flags chosen images.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from sdserve.pipeline.models import save_sd_folder, sd_pipeline, sdxl_pipeline
from sdserve.testing.architectures import ARCHS, random_parts
from sdserve.testing.controlnets import add_controlnets
from sdserve.testing.dit_models import TINY_DIT_ARCHS, write_dit_folder
from sdserve.testing.safety_checkers import add_safety_checker

logger = logging.getLogger(__name__)

TINY_VERSION = "tiny-v1"
"""Named in the model's README; bump when the architectures change."""

TINY_ARCHS = ("tiny", "tiny-sd15-layout", "tiny-inpaint", "tiny-sd2", "tiny-sdxl",
              "tiny-controlnet", "tiny-sdxl-controlnet", "tiny-sd3", "tiny-flux")  # fmt: skip
"""The presets small enough to write as a test model. `tiny-controlnet` is `tiny` (the same
weights) with two random ControlNets in `controlnets/` (`testing.controlnets`), and
`tiny-sdxl-controlnet` is `tiny-sdxl` with them. `tiny-sd3` and `tiny-flux` are diffusion
transformers (`testing.dit_models`)."""


def make_tiny_model(out_dir: str | Path, seed: int = 0, arch: str = "tiny", *,
                    safety_checker: bool = False) -> Path:  # fmt: skip
    """Writes the tiny model to `out_dir` (which must not exist yet, or be empty), with a tiny
    random safety checker (`safety_checkers.add_safety_checker`) when `safety_checker`.

    The folder is built in a temporary sibling and renamed into place, so concurrent callers
    never see a half-written folder.
    """
    if arch not in TINY_ARCHS:
        raise ValueError(f"unknown tiny architecture {arch!r}; choose one of {TINY_ARCHS}")
    write = write_dit_folder if arch in TINY_DIT_ARCHS else _write_unet_folder

    def write_with_readme(tmp: Path) -> None:
        family = write(tmp, seed, arch)
        checker = ""
        if safety_checker:
            add_safety_checker(tmp, seed)
            checker = " --safety-checker"
        (tmp / "README.md").write_text(
            f"# sdserve {TINY_VERSION} (seed {seed}, {arch})\n\n"
            f"Random weights in {family}'s architecture, made by "
            f"`sdserve make-tiny-model DIR --seed {seed} --arch {arch}{checker}`. It generates "
            "noise; it is for tests and benchmarks.\n"
        )

    return _write_in_place(Path(out_dir).expanduser(), write_with_readme)


def _write_unet_folder(out: Path, seed: int, arch: str) -> str:
    """Writes U-Net preset `arch` (and its ControlNets, for a `-controlnet` one) into the empty
    folder `out`; returns the model family, for the README."""
    base = arch.removesuffix("-controlnet")
    parts, scheduler = random_parts(base, seed), ARCHS[base].scheduler
    if "text_encoder_2" in parts:
        pipe, family = sdxl_pipeline(parts, scheduler), "SDXL"
    else:
        pipe = sd_pipeline(parts["vae"], parts["text_encoder"], parts["tokenizer"],
                           parts["unet"], scheduler)  # fmt: skip
        family = "Stable Diffusion 2.x" if base == "tiny-sd2" else "Stable Diffusion 1.x"
    save_sd_folder(pipe, out, scheduler)
    if arch != base:
        add_controlnets(out, parts["unet"], seed)
    return family


def _write_in_place(out: Path, write: Callable[[Path], None]) -> Path:
    """Runs `write` on a temporary sibling of `out` (which must not exist, or be empty), then
    renames it to `out`; on any failure the temporary folder is removed."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        write(tmp)
        if out.exists():
            if any(out.iterdir()):
                raise FileExistsError(f"{out} exists and is not empty")
            out.rmdir()
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
