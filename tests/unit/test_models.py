"""Model folders: the tiny model's reproducibility, and clear errors for broken folders."""

import shutil

import pytest

from sdserve.errors import ModelFolderError
from sdserve.pipeline import models
from sdserve.pipeline.denoise import Denoiser
from sdserve.testing.tiny import make_tiny_model


def _weights(folder):
    return {
        str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*.safetensors"))
    }


def test_tiny_model_is_reproducible_for_a_seed(tiny_model, tmp_path):
    # the session's tiny model is tiny's weights with two random ControlNets
    again = make_tiny_model(tmp_path / "again", seed=0, arch="tiny-controlnet")
    other = make_tiny_model(tmp_path / "other", seed=1, arch="tiny-controlnet")
    assert _weights(again) == _weights(tiny_model)
    assert set(_weights(other)) == set(_weights(tiny_model))
    assert (
        _weights(other)["unet/diffusion_pytorch_model.safetensors"]
        != _weights(tiny_model)["unet/diffusion_pytorch_model.safetensors"]
    )


def test_tiny_model_has_the_sd_layout(tiny_model):
    for part in models.PARTS:
        assert (tiny_model / part).is_dir()
    assert models.check_model_dir(tiny_model, tuple(models.PARTS)) == tiny_model.resolve()


def test_make_tiny_model_refuses_a_non_empty_folder(tmp_path):
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "file").write_text("keep me")
    with pytest.raises(FileExistsError):
        make_tiny_model(tmp_path / "x")
    assert (tmp_path / "x" / "file").read_text() == "keep me"


def test_missing_parts_are_named(tiny_model, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(tiny_model, broken)
    (broken / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    (broken / "model_index.json").unlink()
    with pytest.raises(ModelFolderError) as err:
        Denoiser(broken)
    assert "unet/diffusion_pytorch_model.safetensors" in str(err.value)
    assert "model_index.json" in str(err.value)
    # The text encoder does not need the U-Net, so only the index is reported for it.
    with pytest.raises(ModelFolderError) as err:
        models.check_model_dir(broken, ("tokenizer", "text_encoder"))
    assert "unet" not in str(err.value)


def test_not_a_folder(tmp_path):
    with pytest.raises(ModelFolderError, match="does not exist"):
        models.check_model_dir(tmp_path / "nope", ("unet",))


def test_the_default_model_ships_with_sdserve():
    from sdserve.constants import DEFAULT_MODEL_DIR, resolve_model_dir

    root = resolve_model_dir(None)
    assert root == DEFAULT_MODEL_DIR
    models.check_model_dir(root, ("tokenizer", "text_encoder", "unet", "vae", "scheduler"))
    assert (root / "README.md").is_file()  # the model card
    size = sum(f.stat().st_size for f in root.rglob("*") if f.is_file())
    assert size <= 20 * 2**20


def test_device_and_dtype_defaults(monkeypatch):
    import torch

    from sdserve.pipeline import precision

    assert precision.resolve_dtype("auto", torch.device("cuda")) == torch.float16
    assert precision.resolve_dtype("bfloat16", torch.device("cpu")) == torch.bfloat16
    assert precision.resolve_dtype("float32", torch.device("cuda")) == torch.float32
    # auto on a CPU: bfloat16 where oneDNN has bf16 matmuls in hardware, else float32
    for has_bf16, expected in ((True, torch.bfloat16), (False, torch.float32)):
        monkeypatch.setattr(precision, "cpu_has_bf16_matmul", lambda has_bf16=has_bf16: has_bf16)
        assert precision.resolve_dtype("auto", torch.device("cpu")) == expected
