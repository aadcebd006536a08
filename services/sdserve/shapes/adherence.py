"""Does an image follow its prompt? A checker independent of any diffusion model.

- Background color: the median of the border pixels, snapped to the nearest palette color.
- Foreground color: the median of the pixels whose nearest palette color is not the
  background's, snapped likewise.
- Shape: two features of the foreground mask (how much of its bounding box it fills, and how
  that fill is spread between the box's top and bottom halves), classified by the nearest
  centroid. `ShapeClassifier.fit` learns the centroids from synthetic renders only
  (`pipeline/synthetic.py`), never from generated images.

The palette is the 8 colors of the default model's grammar and the `EXTRA_COLORS` that adapters
teach (cyan). `check` judges a caption with the 8 colors and the extra colors the caption names
(`palette_for`), so that the default model's own prompts are judged exactly as before cyan
existed (a blend of blue and green at an edge is not cyan there); the functions below take
`colors` (default: every color the checker knows).
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image

from sdserve.shapes.synthetic import (
    ALL_COLORS,
    COLORS,
    EXTRA_COLORS,
    SHAPES,
    Caption,
    random_caption,
    render,
)

Colors = Sequence[str] | None
"""Color names of the palette to snap to; None: every color the checker knows (`ALL_COLORS`)."""


def palette_for(caption: Caption) -> tuple[str, ...]:
    """The colors a caption is judged with: the 8 `COLORS` and the extra colors it names."""
    extra = [c for c in EXTRA_COLORS if c in (caption.color, caption.background)]
    return (*COLORS, *extra)


def _palette(colors: Colors) -> tuple[list[str], np.ndarray]:
    names = sorted(ALL_COLORS if colors is None else colors)
    return names, np.array([ALL_COLORS[name] for name in names], dtype=float)


def nearest_color(rgb: np.ndarray, colors: Colors = None) -> str:
    names, palette = _palette(colors)
    return names[int(np.argmin(((palette - rgb) ** 2).sum(axis=1)))]


def _pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB"), dtype=float)


def background_color(image: Image.Image, colors: Colors = None) -> str:
    px = _pixels(image)
    border = np.concatenate([px[0], px[-1], px[:, 0], px[:, -1]])
    return nearest_color(np.median(border, axis=0), colors)


def foreground_mask(image: Image.Image, colors: Colors = None) -> np.ndarray:
    """Pixels whose nearest palette color is not the background's."""
    names, palette = _palette(colors)
    px = _pixels(image)
    nearest = (((px[:, :, None, :] - palette) ** 2).sum(axis=-1)).argmin(axis=-1)
    return nearest != names.index(background_color(image, colors))


def foreground_color(image: Image.Image, colors: Colors = None) -> str | None:
    mask = foreground_mask(image, colors)
    if mask.sum() < 4:
        return None
    return nearest_color(np.median(_pixels(image)[mask], axis=0), colors)


def shape_features(mask: np.ndarray) -> np.ndarray:
    """(fill of the bounding box, top-half fill minus bottom-half fill)."""
    ys, xs = np.nonzero(mask)
    if len(ys) < 4:
        return np.array([0.0, 0.0])
    box = mask[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1]
    half = box.shape[0] // 2
    top, bottom = box[:half].mean() if half else 0.0, box[half:].mean()
    return np.array([box.mean(), top - bottom])


@dataclass
class ShapeClassifier:
    centroids: dict[str, np.ndarray]

    @classmethod
    def fit(cls, n_per_shape: int = 60, seed: int = 1234, size: int = 64) -> ShapeClassifier:
        """Centroids of the features of synthetic renders of each shape."""
        rng = random.Random(seed)
        features: dict[str, list[np.ndarray]] = {shape: [] for shape in SHAPES}
        while min(len(v) for v in features.values()) < n_per_shape:
            caption = random_caption(rng)
            if len(features[caption.shape]) < n_per_shape:
                mask = foreground_mask(render(caption, rng, size))
                features[caption.shape].append(shape_features(mask))
        return cls({shape: np.mean(f, axis=0) for shape, f in features.items()})

    def predict(self, image: Image.Image, colors: Colors = None) -> str:
        f = shape_features(foreground_mask(image, colors))
        return min(self.centroids, key=lambda s: float(((self.centroids[s] - f) ** 2).sum()))


@dataclass(frozen=True)
class Verdict:
    color: bool
    background: bool
    shape: bool


def check(image: Image.Image, caption: Caption, shapes: ShapeClassifier) -> Verdict:
    """Whether the image shows the caption's foreground color, background color and shape,
    judged with the caption's palette (`palette_for`)."""
    colors = palette_for(caption)
    return Verdict(
        color=foreground_color(image, colors) == caption.color,
        background=background_color(image, colors) == caption.background,
        shape=shapes.predict(image, colors) == caption.shape,
    )
