"""What each model family takes: the checks `StagePath.validate` runs once it knows the family
of the model a request names.

The diffusion transformers (SD3, FLUX) take text-to-image requests with their own knobs
(`max_sequence_length`, FLUX's `true_cfg_scale`, `shift`) and the flow-matching sampler; what
this version does not run on them (image inputs, LoRA adapters, DeepCache, ControlNets) is
refused by name, as are their knobs on a U-Net model.
"""

from __future__ import annotations

import dataclasses

from sdserve.api.types import GenerateFields, GenerateParams
from sdserve.constants import DEFAULT_MAX_SEQUENCE_LENGTH, MAX_SEQUENCE_LENGTH
from sdserve.errors import InvalidArgument
from sdserve.stages.messages import DenoiserInfo

FLOW_SAMPLER = "flow_euler"
"""The diffusion transformers' sampler (their folder's FlowMatchEulerDiscreteScheduler)."""


def with_uncond(params: GenerateParams, family: str) -> bool:
    """Whether a request encodes its negative prompt: with classifier-free guidance. FLUX's
    `guidance_scale` is an embedding; its CFG is `true_cfg_scale`."""
    if family == "flux":
        return params.true_cfg_scale > 1
    return params.guided


def check_transformer_request(params: GenerateParams, fields: GenerateFields, model: str,
                              info: DenoiserInfo) -> GenerateParams:  # fmt: skip
    """A request to an SD3 or FLUX model: its T5 length filled in, or InvalidArgument naming
    the first field this family does not take."""
    family = info.family
    unsupported = (
        ("init_image", bool(params.init_image)),
        ("mask_image", bool(params.mask_image)),
        ("loras", bool(params.loras)),
        ("cache_interval", params.cache_interval > 1),
        ("controls", bool(params.controls)),
        ("true_cfg_scale", family != "flux" and fields.true_cfg_scale is not None),
    )
    for name, present in unsupported:
        if present:
            raise InvalidArgument(name, f"model {model!r} is a {family} model (a diffusion "
                                  f"transformer), which does not take {name} in this "
                                  "version")  # fmt: skip
    if params.scheduler != FLOW_SAMPLER:
        raise InvalidArgument("scheduler", f"model {model!r} is a {family} model, whose only "
                              f"sampler is {FLOW_SAMPLER!r} (flow matching)")  # fmt: skip
    multiple = 2 * info.vae_scale_factor
    for name in ("width", "height"):
        if getattr(params, name) % multiple:
            raise InvalidArgument(name, f"must be a multiple of {multiple} for {family} model "
                                  f"{model!r}, got {getattr(params, name)}")  # fmt: skip
    length = params.max_sequence_length or DEFAULT_MAX_SEQUENCE_LENGTH[family]
    if not 1 <= length <= MAX_SEQUENCE_LENGTH:
        raise InvalidArgument("max_sequence_length", f"must be within 1..{MAX_SEQUENCE_LENGTH},"
                              f" got {length}")  # fmt: skip
    return dataclasses.replace(params, max_sequence_length=length)


def check_unet_request(params: GenerateParams, fields: GenerateFields, model: str) -> None:
    """A request to a U-Net model (SD 1.x/2.x, SDXL): InvalidArgument naming a diffusion
    transformer's field or sampler."""
    for name in ("max_sequence_length", "true_cfg_scale", "shift"):
        if getattr(fields, name) is not None:
            raise InvalidArgument(name, f"model {model!r} is a U-Net model; {name} is for "
                                  "diffusion transformers (sd3, flux)")  # fmt: skip
    if params.scheduler == FLOW_SAMPLER:
        raise InvalidArgument("scheduler", f"{FLOW_SAMPLER!r} is the diffusion transformers' "
                              f"sampler; model {model!r} is a U-Net model")  # fmt: skip
