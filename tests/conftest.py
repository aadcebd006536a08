"""Fixtures shared by unit and integration tests."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    """The tiny random-weight model (seed 0), written once per session, with its two random
    ControlNets in `controlnets/` (`--arch tiny-controlnet`: the weights of `tiny`)."""
    from sdserve.testing.tiny import make_tiny_model

    out = tmp_path_factory.mktemp("models") / "tiny"
    return make_tiny_model(out, seed=0, arch="tiny-controlnet")


@pytest.fixture(scope="session")
def tiny_controlnets(tiny_model, tmp_path_factory) -> Path:
    """A ControlNet folder for the tiny model (its `controlnet_dir`): its own "edges" and
    "depth", and "xl-edges", the "edges" net of a tiny SDXL (another model family)."""
    import shutil

    from sdserve.testing.tiny import make_tiny_model

    folder = tmp_path_factory.mktemp("controlnets")
    for name in ("edges", "depth"):
        shutil.copytree(tiny_model / "controlnets" / name, folder / name)
    xl = make_tiny_model(tmp_path_factory.mktemp("models") / "xl", arch="tiny-sdxl-controlnet")
    shutil.copytree(xl / "controlnets" / "edges", folder / "xl-edges")
    return folder


@pytest.fixture(scope="session")
def tiny_loras(tiny_model, tmp_path_factory) -> dict[str, Path]:
    """An adapter folder for the tiny model (its `lora_dir`): "ink" (diffusers format, in a
    folder, with text-encoder weights), "grain" (one kohya-style file), and "broken" (a
    safetensors file that is no LoRA)."""
    import torch
    from safetensors.torch import save_file

    from sdserve.pipeline.denoise import Denoiser
    from sdserve.pipeline.text import TextEncoder
    from sdserve.testing.loras import write_random_lora

    folder = tmp_path_factory.mktemp("loras")
    unet = Denoiser(tiny_model, dtype="float32").unet
    text = TextEncoder(tiny_model, dtype="float32").model
    files = {
        "ink": write_random_lora(unet, folder / "ink" / "pytorch_lora_weights.safetensors",
                                 seed=1, text_encoder=text, alpha=2),
        "grain": write_random_lora(unet, folder / "grain.safetensors", seed=2, kohya=True,
                                   alpha=2),
    }  # fmt: skip
    save_file({"weight": torch.zeros(2, 2)}, folder / "broken.safetensors")
    return files


@pytest.fixture(scope="session")
def tiny_inpaint_model(tmp_path_factory) -> Path:
    """The tiny model with a 9-channel inpainting U-Net (`--arch tiny-inpaint`)."""
    from sdserve.testing.tiny import make_tiny_model

    out = tmp_path_factory.mktemp("models") / "tiny-inpaint"
    return make_tiny_model(out, seed=0, arch="tiny-inpaint")


@pytest.fixture(scope="session")
def tiny_sdxl_model(tmp_path_factory) -> Path:
    """A tiny random-weight SDXL (`--arch tiny-sdxl`: two text encoders, text/time embeds)."""
    from sdserve.testing.tiny import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("models") / "tiny-sdxl", arch="tiny-sdxl")


@pytest.fixture(scope="session")
def tiny_sd3_model(tmp_path_factory) -> Path:
    """A tiny random-weight SD 3.5 (`--arch tiny-sd3`: two CLIPs, T5, an MMDiT)."""
    from sdserve.testing.tiny import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("models") / "tiny-sd3", arch="tiny-sd3")


@pytest.fixture(scope="session")
def tiny_flux_model(tmp_path_factory) -> Path:
    """A tiny random-weight FLUX.1 (`--arch tiny-flux`: CLIP-L, T5, a Flux transformer)."""
    from sdserve.testing.tiny import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("models") / "tiny-flux", arch="tiny-flux")


@pytest.fixture(scope="session")
def diffusers_pipe(tiny_model):
    """diffusers' own StableDiffusionPipeline on the tiny model: the peer oracle."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(tiny_model, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="session")
def in_process_path(tiny_model, tiny_loras):
    """The request path over the in-process stage client on the tiny model (with the test
    adapters): the serving code (StagePath, the stage services, the engine) without Ray. In
    float32 and eager, as the diffusers it is compared with."""
    from helpers import EAGER

    from sdserve.config import ModelConfig, SdserveConfig
    from sdserve.orchestration.in_process import InProcessStageClient
    from sdserve.orchestration.path import StagePath

    lora_dir = str(tiny_loras["grain"].parent)
    config = SdserveConfig(model=ModelConfig(path=str(tiny_model), lora_dir=lora_dir,
                                             dtype="float32"), **EAGER)  # fmt: skip
    client = InProcessStageClient.from_config(config)
    yield StagePath(client, config)
    client.close()


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory):
    """A redis-server of the test session's own on a free port (append-only file on)."""
    from helpers import RedisServer

    server = RedisServer(tmp_path_factory.mktemp("redis")).start()
    yield server
    server.stop()
