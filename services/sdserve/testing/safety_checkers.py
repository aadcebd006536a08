"""A tiny random safety checker for the tiny models (`sdserve make-tiny-model
--safety-checker`), and setting which images it flags.

`add_safety_checker` writes `safety_checker/` (diffusers' StableDiffusionSafetyChecker on a
2-layer, 32-wide CLIP vision tower with 32x32 patches of a 224x224 input, projected to 16) and
`feature_extractor/` (a CLIPImageProcessor at 224, SD's own preprocessing) into a model folder,
and names them in its model_index.json, so `StableDiffusionPipeline.from_pretrained` loads them.

A random checker's concept embeddings flag nothing in particular, so `tune_safety_checker`
rewrites them from images: one concept, the direction in the embedding space that puts the
images to flag on one side of a threshold and the others on the other side (`set_concepts`);
the other concepts and the special-care ones never fire. By default (`reference_images`) the
checker flags a red square on black and diagonal stripes, and passes a white image and a grey
ramp.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from sdserve.pipeline.safety import (
    CHECKER_DIR,
    FEATURE_EXTRACTOR_DIR,
    Images,
    SafetyChecker,
    to_pil,
)

CROP = 224
"""The vision tower's input size, and the feature extractor's resize and crop (SD's)."""

NEVER = 2.0
"""A threshold no cosine reaches: the concept never fires."""

MIN_MARGIN = 0.01
"""The least gap `set_concepts` accepts between its threshold and any image's cosine (the
checker rounds scores to 3 decimals; bfloat16 moves cosines by about 0.01)."""


def random_safety_checker(seed: int = 0):
    """A StableDiffusionSafetyChecker on a tiny CLIP (random weights seeded by `seed`) and
    SD's CLIPImageProcessor at `CROP`: (checker, feature_extractor)."""
    from diffusers.pipelines.stable_diffusion.safety_checker import (
        StableDiffusionSafetyChecker,
    )
    from transformers import CLIPConfig, CLIPImageProcessor

    tower = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=2)
    config = CLIPConfig(
        text_config=dict(tower),  # unused by the checker; saved in its config
        vision_config=dict(tower, image_size=CROP, patch_size=32),
        projection_dim=16,
    )
    torch.manual_seed(seed)
    checker = StableDiffusionSafetyChecker(config).eval().requires_grad_(False)
    extractor = CLIPImageProcessor(
        size={"shortest_edge": CROP}, crop_size={"height": CROP, "width": CROP}
    )
    return checker, extractor


def add_safety_checker(
    model_dir: str | Path,
    seed: int = 0,
    flagged: Images | None = None,
    passed: Images | None = None,
) -> Path:
    """Writes a random checker (seed + 20) into `model_dir`'s `safety_checker/` and
    `feature_extractor/`, tuned to flag `flagged` and pass `passed` (default:
    `reference_images`), and names it in model_index.json where the pipeline has a
    `safety_checker` component (SD 1.x/2.x); returns the model folder."""
    root = Path(model_dir)
    checker, extractor = random_safety_checker(seed + 20)
    if flagged is None or passed is None:
        flagged, passed = reference_images()
    set_concepts(checker, extractor, flagged, passed)
    checker.save_pretrained(root / CHECKER_DIR, safe_serialization=True)
    extractor.save_pretrained(root / FEATURE_EXTRACTOR_DIR)
    index_path = root / "model_index.json"
    index = json.loads(index_path.read_text()) if index_path.is_file() else {}
    if "safety_checker" in index:
        index["safety_checker"] = ["stable_diffusion", "StableDiffusionSafetyChecker"]
        index["feature_extractor"] = ["transformers", "CLIPImageProcessor"]
        index["requires_safety_checker"] = True
        index_path.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    return root


def tune_safety_checker(model_dir: str | Path, flagged: Images, passed: Images) -> None:
    """Rewrites the model folder's checker so that it flags `flagged` and passes `passed`
    (`set_concepts`)."""
    root = Path(model_dir)
    loaded = SafetyChecker(root, device="cpu", dtype="float32")
    set_concepts(loaded.model, loaded.feature_extractor, flagged, passed)
    loaded.model.save_pretrained(root / CHECKER_DIR, safe_serialization=True)


@torch.no_grad()
def set_concepts(checker, extractor, flagged: Images, passed: Images) -> None:
    """Sets `checker`'s concepts in place so that it flags `flagged` and passes `passed`.

    Concept 0 is the direction that separates the images' unit embeddings: the least-norm
    (w, b) with `e @ w - b` = +1 for each flagged image's embedding e and -1 for each passed
    one, so that the cosine to w / |w| is b / |w| + 1 / |w| or b / |w| - 1 / |w|; its threshold
    is b / |w|. The other 16 concepts and the 3 special-care ones never fire.

    Raises:
        ValueError: a margin under `MIN_MARGIN` (the images' embeddings are too alike, or more
            than the embedding's width allows to separate).
    """
    probe = SafetyChecker.from_parts(checker, extractor)
    bad, good = _embeddings(probe, flagged), _embeddings(probe, passed)
    if not len(bad):
        raise ValueError("give at least one image to flag")
    embeds = torch.cat([bad, good]).double()
    target = torch.cat([torch.ones(len(bad)), -torch.ones(len(good))]).double()
    system = torch.cat([embeds, -torch.ones(len(embeds), 1, dtype=embeds.dtype)], dim=1)
    solution = torch.linalg.pinv(system) @ target
    norm = solution[:-1].norm()
    concept, threshold = (solution[:-1] / norm).float(), float(solution[-1] / norm)
    scores = embeds.float() @ concept - threshold
    margin = float(torch.cat([scores[: len(bad)], -scores[len(bad) :]]).min())
    if margin < MIN_MARGIN:
        raise ValueError(
            f"the flagged and passed images' embeddings are too alike to separate (margin "
            f"{margin:.4f} < {MIN_MARGIN}); choose images that differ more"
        )
    checker.concept_embeds.copy_(concept.expand_as(checker.concept_embeds))
    checker.concept_embeds_weights.fill_(NEVER)
    checker.concept_embeds_weights[0] = threshold
    checker.special_care_embeds.copy_(concept.expand_as(checker.special_care_embeds))
    checker.special_care_embeds_weights.fill_(NEVER)


def _embeddings(probe: SafetyChecker, images: Images) -> torch.Tensor:
    """The checker's unit image embeddings (float32, (N, projection_dim)), as its forward
    computes them before the cosines."""
    if not len(images):
        return torch.zeros(0, probe.model.visual_projection.out_features)
    pixels = probe.feature_extractor(to_pil(images), return_tensors="pt").pixel_values
    model = probe.model
    pooled = model.vision_model(pixels.to(model.device, model.dtype))[1]
    return torch.nn.functional.normalize(model.visual_projection(pooled).float())


def reference_images(size: int = 64) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Two images the default tiny checker flags (a red square on black, diagonal stripes)
    and two it passes (white, a grey ramp): ([flagged], [passed]), uint8 (size, size, 3)."""
    square = np.zeros((size, size, 3), np.uint8)
    square[size // 4 : size * 3 // 4, size // 4 : size * 3 // 4, 0] = 255
    rows, cols = np.indices((size, size))
    stripes = np.repeat((((rows + cols) // 8) % 2 * 255).astype(np.uint8)[..., None], 3, axis=-1)
    white = np.full((size, size, 3), 255, np.uint8)
    ramp = np.repeat(np.tile(np.linspace(0, 255, size).astype(np.uint8), (size, 1))[..., None],
                     3, axis=-1)  # fmt: skip
    return [square, stripes], [white, ramp]
