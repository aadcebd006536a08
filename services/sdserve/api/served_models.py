"""What a server serves (what ListModels returns): each model and how its stages compute.

Plain dataclasses: `sdserve.api.proto` makes the public `ModelInfo` of them.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class StageRun:
    """How one stage of a served model computes."""

    stage: str
    """"text_encoder", "vae_encoder", "denoiser" or "vae_decoder"."""
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
    """"sd1", "sd2" or "sdxl"."""
    native_size: tuple[int, int]
    """(width, height) in pixels."""
    prediction_type: str
    default_scheduler: str
    inpainting: bool
    stages: tuple[StageRun, ...] = ()
    """How each stage computes, in request order."""

    @property
    def image_inputs(self) -> bool:
        """Whether it takes init_image (and mask_image): SDXL does not in this version."""
        return self.family != "sdxl"

    @classmethod
    def from_info(cls, name: str, info, default_scheduler: str, stages=()) -> ServedModel:
        """From its Denoiser's `DenoiserInfo` and its stages' `StageInfo`s
        (`sdserve.stages.messages`)."""
        return cls(
            name=name,
            family=info.family or "sd1",
            native_size=(info.native_width, info.native_height),
            prediction_type=info.prediction_type or "epsilon",
            default_scheduler=default_scheduler,
            inpainting=info.unet_in_channels == 9,
            stages=tuple(StageRun.from_info(stage) for stage in stages),
        )
