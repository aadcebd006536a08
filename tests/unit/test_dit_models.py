"""The random-weight diffusion transformers (`testing.dit_models`): the tiny SD 3.5 and FLUX.1
folders load in diffusers' own pipelines and run, the same seed gives the same weights, the T5
tokenizer survives a reload, and the full-size presets have the real models' sizes."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from sdserve.testing.dit_models import (
    FLUX_SCHEDULER,
    SD3_SCHEDULER,
    parameter_counts,
    write_dit_folder,
)
from sdserve.testing.tiny import make_tiny_model

PIPELINES = {"tiny-sd3": "StableDiffusion3Pipeline", "tiny-flux": "FluxPipeline"}
T5_PART = {"tiny-sd3": "tokenizer_3", "tiny-flux": "tokenizer_2"}


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    """Both tiny diffusion transformers, seed 0."""
    root = tmp_path_factory.mktemp("dit")
    return {arch: make_tiny_model(root / arch, seed=0, arch=arch) for arch in PIPELINES}


@pytest.fixture(scope="module")
def pipes(folders) -> dict[str, object]:
    """Each folder loaded from disk by its diffusers pipeline class, in float32."""
    import diffusers

    pipes = {}
    for arch, folder in folders.items():
        pipe_cls = getattr(diffusers, PIPELINES[arch])
        pipes[arch] = pipe_cls.from_pretrained(folder, dtype=torch.float32, local_files_only=True)
        pipes[arch].set_progress_bar_config(disable=True)
    return pipes


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _weights(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): _sha256(p) for p in sorted(folder.rglob("*.safetensors"))}


@pytest.mark.parametrize("arch", list(PIPELINES))
@pytest.mark.parametrize("size", [64, 128])  # native, and twice it (SD3's position table)
def test_tiny_dit_runs_in_diffusers(pipes, arch, size):
    pipe = pipes[arch]
    images = pipe("a red circle", num_inference_steps=2, height=size, width=size,
                  output_type="np", generator=torch.Generator().manual_seed(0),
                  max_sequence_length=48).images  # fmt: skip
    assert images.shape == (1, size, size, 3)
    assert np.isfinite(images).all() and images.std() > 0


def test_tiny_dit_folders(folders):
    sd3, flux = folders["tiny-sd3"], folders["tiny-flux"]
    index = json.loads((sd3 / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusion3Pipeline"
    assert index["text_encoder"] == ["transformers", "CLIPTextModelWithProjection"]
    assert index["text_encoder_2"] == ["transformers", "CLIPTextModelWithProjection"]
    assert index["text_encoder_3"] == ["transformers", "T5EncoderModel"]
    assert index["transformer"] == ["diffusers", "SD3Transformer2DModel"]
    index = json.loads((flux / "model_index.json").read_text())
    assert index["_class_name"] == "FluxPipeline"
    assert index["text_encoder"] == ["transformers", "CLIPTextModel"]
    assert index["text_encoder_2"] == ["transformers", "T5EncoderModel"]
    for folder, scheduler in ((sd3, SD3_SCHEDULER), (flux, FLUX_SCHEDULER)):
        config = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
        assert config == scheduler  # verbatim
        assert "Random weights" in (folder / "README.md").read_text()
        assert (folder / "transformer" / "diffusion_pytorch_model.safetensors").is_file()
        assert not list(folder.rglob("*.bin"))


def test_same_seed_same_weights(folders, tmp_path):
    for arch, folder in folders.items():
        again = make_tiny_model(tmp_path / f"{arch}-again", seed=0, arch=arch)
        other = make_tiny_model(tmp_path / f"{arch}-other", seed=1, arch=arch)
        assert _weights(again) == _weights(folder)
        transformer = "transformer/diffusion_pytorch_model.safetensors"
        assert _weights(other)[transformer] != _weights(folder)[transformer]


@pytest.mark.parametrize("arch", list(PIPELINES))
def test_t5_tokenizer_reloads(folders, arch):
    from transformers import T5TokenizerFast

    tok = T5TokenizerFast.from_pretrained(folders[arch] / T5_PART[arch], local_files_only=True)
    texts = ["a red circle", "A blue square, 3 of them!", "café"]
    ids = tok(texts, padding="max_length", max_length=48, truncation=True,
              add_special_tokens=True, return_tensors="pt").input_ids  # fmt: skip
    assert ids.shape == (3, 48)
    assert len({tuple(row.tolist()) for row in ids}) == 3
    assert (ids[:2] != tok.unk_token_id).all()  # every ASCII character is a token
    first = ids[0].tolist()
    assert first[len("a red circle") + 1] == tok.eos_token_id  # "▁", "a", "▁", "r", ..., "</s>"
    assert set(first[len("a red circle") + 2 :]) == {tok.pad_token_id}
    assert tok.decode(ids[1], skip_special_tokens=True) == texts[1]


def test_max_sequence_length(pipes):
    """T5 gives `max_sequence_length` states; SD3 puts CLIP's 77 before them."""
    kwargs = dict(prompt_2=None, device=torch.device("cpu"), max_sequence_length=48)
    sd3_embeds, _, pooled, _ = pipes["tiny-sd3"].encode_prompt(
        "a red circle", prompt_3=None, do_classifier_free_guidance=False, **kwargs
    )
    assert sd3_embeds.shape == (1, 77 + 48, 64) and pooled.shape == (1, 64)
    flux_embeds, pooled, text_ids = pipes["tiny-flux"].encode_prompt("a red circle", **kwargs)
    assert flux_embeds.shape == (1, 48, 64) and pooled.shape == (1, 32)
    assert text_ids.shape == (48, 3)


def test_write_dit_folder_writes_only_tiny_presets(tmp_path):
    with pytest.raises(ValueError, match="not a tiny diffusion transformer"):
        write_dit_folder(tmp_path, 0, "flux-dev")


def test_full_size_parameter_counts():
    """Counted on the meta device: nothing is allocated."""
    sd3, flux = parameter_counts("sd3.5-medium"), parameter_counts("flux-dev")
    assert 2.24e9 <= sd3["transformer"] <= 2.5e9  # 2,243.2 M (+ a 226.5 M position table)
    assert 11.8e9 <= flux["transformer"] <= 12.0e9  # 11,901.4 M
    assert 4.7e9 <= sd3["text_encoder_3"] == flux["text_encoder_2"] <= 4.8e9  # T5-XXL, 4,762.3 M
    assert 83e6 <= sd3["vae"] == flux["vae"] <= 84e6
    assert 123e6 <= flux["text_encoder"] < sd3["text_encoder"] <= 124e6  # CLIP-L (+ projection)
    assert 690e6 <= sd3["text_encoder_2"] <= 700e6  # CLIP-G
