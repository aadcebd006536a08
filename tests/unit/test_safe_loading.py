"""Weights load from safetensors only (issue 27): unpickling a `.bin` runs code from the file, so
a model folder with only pickled weights is refused, naming the file and the setting that
allows it, and every `from_pretrained` asks for safetensors."""

from __future__ import annotations

import shutil

import pytest
import torch
from safetensors.torch import load_file

from sdserve.errors import ModelFolderError
from sdserve.pipeline import models
from sdserve.pipeline.denoise import Denoiser

PICKLED = "unet/diffusion_pytorch_model.bin"


@pytest.fixture(scope="module")
def pickled_model(tiny_model, tmp_path_factory):
    """The tiny model with its U-Net's weights as a pickled `.bin` only."""
    root = tmp_path_factory.mktemp("pickled") / "model"
    shutil.copytree(tiny_model, root)
    weights = root / "unet" / "diffusion_pytorch_model.safetensors"
    torch.save(load_file(weights), root / PICKLED)
    weights.unlink()
    return root


def test_the_tiny_models_and_the_default_model_hold_safetensors_only(tiny_model):
    from sdserve.constants import resolve_model_dir

    for root in (tiny_model, resolve_model_dir(None)):
        weights = [p for p in root.rglob("*") if p.suffix in models.PICKLE_SUFFIXES]
        assert weights == [], weights
        for part in ("unet", "vae", "text_encoder"):
            assert list((root / part).glob("*.safetensors")), (root, part)


def test_a_folder_with_only_pickled_weights_is_refused_naming_the_file(pickled_model):
    with pytest.raises(ModelFolderError) as err:
        Denoiser(pickled_model, device="cpu", dtype="float32")
    assert PICKLED in str(err.value) and "allow_pickle" in str(err.value)


def test_allow_pickle_loads_it(pickled_model, tiny_model):
    root = models.check_model_dir(pickled_model, ("unet",), allow_pickle=True)
    unet = models.load_unet(root, torch.device("cpu"), torch.float32, allow_pickle=True)
    reference = models.load_unet(tiny_model, torch.device("cpu"), torch.float32)
    for (name, a), (_, b) in zip(unet.state_dict().items(), reference.state_dict().items(),
                                 strict=True):  # fmt: skip
        assert torch.equal(a, b), name


def test_the_models_config_entry_decides_what_a_stage_loads(pickled_model):
    """`allow_pickle` in a served model's config entry reaches its stages (`load_stage`)."""
    from sdserve.config import ModelConfig
    from sdserve.metrics import StatsLogger
    from sdserve.stages.runtime import load_stage

    entry = dict(name="pickled", path=str(pickled_model), device="cpu", dtype="float32")
    with pytest.raises(ModelFolderError, match="allow_pickle"):
        load_stage(Denoiser, ModelConfig(**entry), "denoiser", StatsLogger())
    loaded = load_stage(Denoiser, ModelConfig(**entry, allow_pickle=True), "denoiser",
                        StatsLogger())  # fmt: skip
    assert loaded.unet is not None


def test_every_from_pretrained_asks_for_safetensors(tiny_model, monkeypatch):
    """diffusers and transformers fall back to a `.bin` beside (or instead of) the safetensors
    file unless told not to."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

    seen = {}
    for cls in (UNet2DConditionModel, AutoencoderKL, CLIPTextModel):
        original = cls.from_pretrained.__func__

        def spy(klass, *args, _original=original, **kwargs):
            seen[klass.__name__] = kwargs.get("use_safetensors")
            return _original(klass, *args, **kwargs)

        monkeypatch.setattr(cls, "from_pretrained", classmethod(spy))
    cpu = torch.device("cpu")
    models.load_unet(tiny_model, cpu, torch.float32)
    models.load_vae(tiny_model, cpu, torch.float32)
    models.load_text_encoder(tiny_model, cpu, torch.float32)
    assert seen == {"UNet2DConditionModel": True, "AutoencoderKL": True, "CLIPTextModel": True}
