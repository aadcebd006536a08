"""What a server serves (what ListModels returns): each model and how its stages compute."""

from __future__ import annotations

from dataclasses import dataclass

from sdserve.v1 import diffusion_pb2


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
        """From a stage's `StageInfo` (a stage message)."""
        return cls(info.stage, info.device, info.dtype, info.compile or "off")

    def to_pb(self) -> diffusion_pb2.ModelStage:
        return diffusion_pb2.ModelStage(stage=self.stage, device=self.device, dtype=self.dtype,
                                        compile=self.compile)  # fmt: skip


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
        """From its Denoiser's `DenoiserInfo` and its stages' `StageInfo`s (stage messages)."""
        return cls(
            name=name,
            family=info.family or "sd1",
            native_size=(info.native_width, info.native_height),
            prediction_type=info.prediction_type or "epsilon",
            default_scheduler=default_scheduler,
            inpainting=info.unet_in_channels == 9,
            stages=tuple(StageRun.from_info(stage) for stage in stages),
        )

    def to_pb(self) -> diffusion_pb2.ModelInfo:
        return diffusion_pb2.ModelInfo(
            name=self.name,
            family=self.family,
            native_width=self.native_size[0],
            native_height=self.native_size[1],
            prediction_type=self.prediction_type,
            default_scheduler=self.default_scheduler,
            inpainting=self.inpainting,
            image_inputs=self.image_inputs,
            stages=[stage.to_pb() for stage in self.stages],
        )

    @classmethod
    def from_pb(cls, pb: diffusion_pb2.ModelInfo) -> ServedModel:
        stages = tuple(StageRun(s.stage, s.device, s.dtype, s.compile) for s in pb.stages)
        return cls(pb.name, pb.family, (pb.native_width, pb.native_height), pb.prediction_type,
                   pb.default_scheduler, pb.inpainting, stages)  # fmt: skip
