"""Names shared by the config tree and the pipeline, in a module with no dependencies (the
pipeline runs on machines that have only torch, transformers and diffusers)."""

from pathlib import Path

SCHEDULER_NAMES = ("ddpm", "ddim", "pndm", "euler", "euler_ancestral", "dpmpp_2m")
"""Sampler names the API accepts (see sdserve.pipeline.schedulers)."""

DEFAULT_MODEL_DIR = Path(__file__).resolve().parent / "shapes" / "default_model"
"""The built-in default model: trained by `sdserve train-default-model` on synthetic shapes, and
shipped with sdserve (see its README.md, the model card)."""


def resolve_model_dir(path: str | None) -> Path:
    """`path` when given; otherwise the built-in default model."""
    return Path(path).expanduser() if path else DEFAULT_MODEL_DIR
