"""Sampler names and how each is built from a model folder's scheduler config.

Schedulers keep state between steps (step index, the multistep solvers' history), so every image
gets a fresh instance: diffusers schedulers are not safe to share (diffusers #3672, #7851).
"""

from __future__ import annotations

from typing import Any

from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
    PNDMScheduler,
)
from diffusers.schedulers.scheduling_utils import SchedulerMixin

from sdserve.constants import SCHEDULER_NAMES

SCHEDULERS: dict[str, type[SchedulerMixin]] = {
    "ddpm": DDPMScheduler,  # Ho et al. 2020: ancestral, needs many steps
    "ddim": DDIMScheduler,  # Song et al. 2020: deterministic (eta=0), 20-50 steps
    "pndm": PNDMScheduler,  # what SD 1.x folders ship as their default
    "euler": EulerDiscreteScheduler,  # Karras et al. 2022, Euler method
    "euler_ancestral": EulerAncestralDiscreteScheduler,  # Euler with fresh noise each step
    "dpmpp_2m": DPMSolverMultistepScheduler,  # DPM-Solver++(2M), 15-25 steps
    "flow_euler": FlowMatchEulerDiscreteScheduler,  # flow matching (SD3, FLUX): pipeline.dit
}
assert tuple(SCHEDULERS) == SCHEDULER_NAMES


def make_scheduler(name: str, config: dict[str, Any]) -> SchedulerMixin:
    """A new scheduler instance, built the way diffusers users build one:
    `SchedulerClass.from_config(<the folder's scheduler config>)`."""
    return SCHEDULERS[name].from_config(config)
