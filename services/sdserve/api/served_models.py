"""What a server serves (what ListModels returns): each model and how its stages compute.

Plain dataclasses: `sdserve.api.proto` makes the public `ModelInfo` of them.
"""

from __future__ import annotations

from dataclasses import dataclass

from sdserve.constants import DIT_DEFAULTS, DIT_FAMILIES, TEXT_ONLY_FAMILIES


@dataclass(frozen=True)
class StageRun:
    """How one stage of a served model computes."""

    stage: str
    """"text_encoder", "text_encoder_t5", "vae_encoder", "denoiser" or "vae_decoder"."""
    device: str
    dtype: str
    """The stage's weights and forwards: "float32", "float16" or "bfloat16"."""
    compile: str
    """torch.compile mode: "off", "default" or "max-autotune"."""

    @classmethod
    def from_info(cls, info) -> StageRun:
        """From a stage's `StageInfo` (`sdserve.stages.messages`)."""
        return cls(info.stage, info.device, info.dtype, info.compile or "off")


@dataclass(frozen=True)
class ServedModel:
    """One model a server serves (what ListModels returns)."""

    name: str
    family: str
    """"sd1", "sd2" or "sdxl" (U-Nets), or a diffusion transformer's: "sd3" or "flux"."""
    native_size: tuple[int, int]
    """(width, height) in pixels."""
    prediction_type: str
    default_scheduler: str
    inpainting: bool
    stages: tuple[StageRun, ...] = ()
    """How each stage computes, in request order."""

    @property
    def image_inputs(self) -> bool:
        """Whether it takes init_image (and mask_image): SDXL and the diffusion transformers do
        not in this version."""
        return self.family not in TEXT_ONLY_FAMILIES

    @classmethod
    def from_info(cls, name: str, info, default_scheduler: str, stages=()) -> ServedModel:
        """From its Denoiser's `DenoiserInfo` and its stages' `StageInfo`s
        (`sdserve.stages.messages`). A diffusion transformer's sampler is its pipeline's
        (`DIT_DEFAULTS`), and its input channels are latents, never an inpainting U-Net's 9."""
        family = info.family or "sd1"
        transformer = family in DIT_FAMILIES
        if transformer:
            default_scheduler = DIT_DEFAULTS[family]["scheduler"]
        return cls(
            name=name,
            family=family,
            native_size=(info.native_width, info.native_height),
            prediction_type=info.prediction_type or "epsilon",
            default_scheduler=default_scheduler,
            inpainting=not transformer and info.unet_in_channels == 9,
            stages=tuple(StageRun.from_info(stage) for stage in stages),
        )
