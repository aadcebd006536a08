"""Helpers shared by the tests (fixtures live in conftest.py)."""

from __future__ import annotations

import json
import socket
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def diffusers_image(
    pipe,
    model_dir: Path,
    scheduler: str,
    *,
    prompt,
    negative_prompt="",
    steps,
    guidance,
    width,
    height,
    seed,
):
    """What diffusers makes for these inputs, as uint8 (h, w, 3).

    The scheduler is built the way diffusers users build one:
    `SchedulerClass.from_config(<the folder's scheduler config>)`.
    """
    import numpy as np
    import torch
    from diffusers import (
        DDIMScheduler,
        DDPMScheduler,
        DPMSolverMultistepScheduler,
        EulerAncestralDiscreteScheduler,
        EulerDiscreteScheduler,
        PNDMScheduler,
    )

    classes = {
        "ddpm": DDPMScheduler,
        "ddim": DDIMScheduler,
        "pndm": PNDMScheduler,
        "euler": EulerDiscreteScheduler,
        "euler_ancestral": EulerAncestralDiscreteScheduler,
        "dpmpp_2m": DPMSolverMultistepScheduler,
    }
    config = json.loads((model_dir / "scheduler" / "scheduler_config.json").read_text())
    pipe.scheduler = classes[scheduler].from_config(config)
    out = pipe(
        prompt,
        negative_prompt=negative_prompt or None,
        num_inference_steps=steps,
        guidance_scale=guidance,
        width=width,
        height=height,
        generator=torch.Generator("cpu").manual_seed(seed),
        output_type="np",
    ).images[0]
    return (out * 255).round().astype(np.uint8)


def solo_latents(
    text,
    denoiser,
    *,
    prompt="a red circle",
    negative_prompt="",
    seeds=(0,),
    steps=6,
    guidance=7.5,
    scheduler="ddim",
    width=64,
    height=64,
):
    """One request through TextEncoder + Denoiser.denoise (no engine): the reference result."""
    cond, uncond = text.encode(prompt, negative_prompt, with_uncond=guidance > 1)
    return denoiser.denoise(
        cond,
        uncond,
        width=width,
        height=height,
        steps=steps,
        guidance_scale=guidance,
        scheduler=scheduler,
        seeds=list(seeds),
    )
