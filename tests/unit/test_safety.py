"""The safety checker equals diffusers' `StableDiffusionPipeline.run_safety_checker` on the tiny
random checker (`make_tiny_model(safety_checker=True)`), in both modes."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from sdserve.cli import build_parser
from sdserve.errors import ModelFolderError
from sdserve.pipeline.safety import SafetyChecker
from sdserve.testing.safety_checkers import reference_images, tune_safety_checker
from sdserve.testing.tiny import make_tiny_model


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("models") / "safe", safety_checker=True)


def _pipeline(model: Path, dtype=torch.float32):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(model, local_files_only=True, dtype=dtype)
    assert pipe.safety_checker is not None and pipe.feature_extractor is not None
    return pipe.set_progress_bar_config(disable=True) or pipe


@pytest.fixture(scope="module")
def pipe(model):
    return _pipeline(model)


def _batch() -> np.ndarray:
    """Six 64x64 images, (N, H, W, 3) uint8: the references, and two of them slightly noisy
    (still flagged and still passed)."""
    flagged, passed = reference_images()
    noise = np.random.default_rng(0).integers(-6, 7, flagged[0].shape)
    noisy = [np.clip(im.astype(int) + noise, 0, 255).astype(np.uint8)
             for im in (flagged[0], passed[1])]  # fmt: skip
    return np.stack([flagged[0], passed[0], flagged[1], passed[1], *noisy])


EXPECTED = [True, False, True, False, True, False]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_batch_equals_run_safety_checker(model, pipe, dtype):
    """uint8 pixels: the flags and the blocked images are the pipeline's for the same images
    (diffusers takes them as floats in [0, 1] and blackens with zeros)."""
    images = _batch()
    checker = SafetyChecker(model, device="cpu", dtype=dtype)
    torch_dtype = getattr(torch, dtype)
    pipe.safety_checker.to(torch_dtype)
    try:
        theirs, nsfw = pipe.run_safety_checker(images / 255.0, "cpu", torch_dtype)
    finally:
        pipe.safety_checker.to(torch.float32)
    assert checker.check(images) == nsfw == EXPECTED
    blocked = checker.apply(images, "block")
    assert blocked.nsfw == nsfw
    np.testing.assert_array_equal(blocked.images, (theirs * 255).round().astype(np.uint8))
    assert not blocked.images[EXPECTED].any()
    np.testing.assert_array_equal(images, _batch())  # the input is untouched
    flagged = checker.apply(images, "flag")
    assert flagged.nsfw == EXPECTED and flagged.images is images


def test_decoded_tensor_path(model, pipe):
    """What `__call__` hands the checker: decoded pixels in [-1, 1]; the postprocessed output
    (black where flagged, `do_denormalize` off there) equals "block" on the uint8 pixels."""
    images = _batch()
    decoded = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255 * 2 - 1
    checked, nsfw = pipe.run_safety_checker(decoded.clone(), "cpu", torch.float32)
    theirs = pipe.image_processor.postprocess(
        checked, output_type="np", do_denormalize=[not flag for flag in nsfw]
    )
    ours = SafetyChecker(model, device="cpu", dtype="float32").apply(images, "block")
    assert ours.nsfw == nsfw == EXPECTED
    np.testing.assert_array_equal(ours.images, (theirs * 255).round().astype(np.uint8))


def test_mixed_sizes_and_pil(model, pipe):
    """A batch of different sizes (arrays and PIL images) gets each image's own flag: what the
    pipeline says for that image alone."""
    flagged, passed = reference_images(96)
    arrays = [flagged[0][:80], passed[0][:, :40], flagged[1][:64, :96], passed[1]]
    images = [arrays[0], Image.fromarray(arrays[1]), Image.fromarray(arrays[2]), arrays[3]]
    alone = [pipe.run_safety_checker(a[None] / 255.0, "cpu", torch.float32)[1][0] for a in arrays]
    checker = SafetyChecker(model, device="cpu", dtype="float32")
    assert checker.check(images) == alone == [True, False, True, False]
    out = checker.apply(images, "block")
    assert not out.images[0].any() and out.images[0].shape == arrays[0].shape
    assert out.images[2].size == (96, 64) and not np.asarray(out.images[2]).any()
    assert out.images[1] is images[1] and out.images[3] is images[3]
    assert images[0] is arrays[0] and arrays[0].any()  # the caller's list is not modified
    assert checker.check([]) == []


def test_generated_images_match_the_pipeline(model, tmp_path):
    """The checker tuned on four of the tiny model's own images: the pipeline's
    `nsfw_content_detected` and images equal `apply(..., "block")` on the unchecked images."""
    folder = shutil.copytree(model, tmp_path / "tuned")
    kwargs = dict(prompt=["a cat"] * 4, num_inference_steps=2, height=64, width=64,
                  output_type="np")  # fmt: skip
    seeded = lambda: [torch.Generator().manual_seed(s) for s in range(4)]  # noqa: E731
    plain = _pipeline(folder)
    plain.safety_checker = None
    raw = plain(generator=seeded(), **kwargs).images
    pixels = (raw * 255).round().astype(np.uint8)
    tune_safety_checker(folder, flagged=[pixels[0], pixels[2]], passed=[pixels[1], pixels[3]])
    out = _pipeline(folder)(generator=seeded(), **kwargs)
    ours = SafetyChecker(folder, device="cpu", dtype="float32").apply(pixels, "block")
    assert ours.nsfw == out.nsfw_content_detected == [True, False, True, False]
    np.testing.assert_array_equal(ours.images, (out.images * 255).round().astype(np.uint8))


def test_folders_and_errors(model, tmp_path):
    checker = SafetyChecker(checker_dir=model / "safety_checker",
                            feature_extractor_dir=model / "feature_extractor", device="cpu",
                            dtype="float32")  # fmt: skip
    with pytest.raises(ValueError, match="unknown safety mode"):
        checker.apply(_batch(), "blur")
    with pytest.raises(ValueError, match="give a model folder"):
        SafetyChecker(checker_dir=model / "safety_checker")
    with pytest.raises(ModelFolderError, match="safety_checker: missing config.json"):
        SafetyChecker(tmp_path)
    pickled = tmp_path / "pickled"
    shutil.copytree(model / "safety_checker", pickled / "safety_checker")
    shutil.copytree(model / "feature_extractor", pickled / "feature_extractor")
    state = {k: v.clone() for k, v in checker.model.state_dict().items()}
    (pickled / "safety_checker" / "model.safetensors").unlink()
    torch.save(state, pickled / "safety_checker" / "pytorch_model.bin")
    with pytest.raises(ModelFolderError, match="pytorch_model.bin holds pickled weights"):
        SafetyChecker(pickled)
    allowed = SafetyChecker(pickled, device="cpu", dtype="float32", allow_pickle=True)
    assert allowed.check(_batch()) == EXPECTED


def test_default_tiny_model_has_no_checker(tiny_model):
    """Without the option the tiny model is as before; the CLI knows the option."""
    assert not (tiny_model / "safety_checker").exists()
    assert json.loads((tiny_model / "model_index.json").read_text())["safety_checker"] == [
        None,
        None,
    ]
    args = build_parser().parse_args(["make-tiny-model", "x", "--safety-checker"])
    assert args.safety_checker
    assert not build_parser().parse_args(["make-tiny-model", "x"]).safety_checker
