"""Names shared by the config tree and the pipeline, in a module with no dependencies (the
pipeline runs on machines that have only torch, transformers and diffusers)."""

from pathlib import Path

UNET_SCHEDULER_NAMES = ("ddpm", "ddim", "pndm", "euler", "euler_ancestral", "dpmpp_2m")
"""The samplers of the U-Net families (SD 1.x/2.x, SDXL): what a config's default sampler
names."""

SCHEDULER_NAMES = (*UNET_SCHEDULER_NAMES, "flow_euler")
"""Sampler names the API accepts (see sdserve.pipeline.schedulers): the U-Net families' and
`flow_euler`, the diffusion transformers' (`DIT_FAMILIES`) only one, their folder's
FlowMatchEulerDiscreteScheduler."""

DIT_FAMILIES = ("sd3", "flux")
"""Model families whose denoiser is a flow-matching transformer, not a U-Net."""

TEXT_ONLY_FAMILIES = ("sdxl", *DIT_FAMILIES)
"""Model families that take no image inputs in this version: they have no VaeEncoder."""

DIT_DEFAULTS = {
    "sd3": {"steps": 28, "guidance_scale": 7.0, "scheduler": "flow_euler"},
    "flux": {"steps": 28, "guidance_scale": 3.5, "scheduler": "flow_euler"},
}
"""The pipelines' own defaults (StableDiffusion3Pipeline, FluxPipeline) for requests to such a
model that set none: the same request to diffusers gives the same image."""

DEFAULT_MAX_SEQUENCE_LENGTH = {"sd3": 256, "flux": 512}
"""The pipelines' default T5 `max_sequence_length`."""

MAX_SEQUENCE_LENGTH = 512
"""The most T5 tokens either pipeline accepts."""

DEFAULT_MODEL_DIR = Path(__file__).resolve().parent / "shapes" / "default_model"
"""The built-in default model: trained by `sdserve train-default-model` on synthetic shapes, and
shipped with sdserve (see its README.md, the model card)."""


def resolve_model_dir(path: str | None) -> Path:
    """`path` when given; otherwise the built-in default model."""
    return Path(path).expanduser() if path else DEFAULT_MODEL_DIR


CHECKER_DIR, FEATURE_EXTRACTOR_DIR = "safety_checker", "feature_extractor"
"""The two folders of a model folder (SD 1.x/2.x checkpoints ship them) that hold its safety
checker: diffusers' `StableDiffusionSafetyChecker` and its `CLIPImageProcessor`."""


def safety_folders(model_dir: Path, configured: str | None = None) -> tuple[Path, Path]:
    """(the checker's folder, the feature extractor's folder) of a model.

    `configured` (`ModelConfig.safety_checker_dir`; relative to the model folder) is a folder
    laid out as a model folder (`safety_checker/` + `feature_extractor/`), or one holding both
    at its root (`config.json`, the weights and `preprocessor_config.json`, as
    CompVis/stable-diffusion-safety-checker ships it). None: the model folder's own."""
    root = model_dir
    if configured:
        root = model_dir / Path(configured).expanduser()
        if not (root / CHECKER_DIR).is_dir():
            return root, root
    return root / CHECKER_DIR, root / FEATURE_EXTRACTOR_DIR
