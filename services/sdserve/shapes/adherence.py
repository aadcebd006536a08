"""Does an image follow its prompt? A checker independent of any diffusion model.

- Background color: the median of the border pixels, snapped to the nearest palette color.
- Foreground color: the median of the pixels whose nearest palette color is not the
  background's, snapped likewise.
- Shape: two features of the foreground mask (how much of its bounding box it fills, and how
  that fill is spread between the box's top and bottom halves), classified by the nearest
  centroid. `ShapeClassifier.fit` learns the centroids from synthetic renders only
  (`pipeline/synthetic.py`), never from generated images.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import numpy as np
from PIL import Image

from sdserve.shapes.synthetic import COLORS, SHAPES, Caption, random_caption, render

_NAMES = sorted(COLORS)
_PALETTE = np.array([COLORS[name] for name in _NAMES], dtype=float)


def nearest_color(rgb: np.ndarray) -> str:
    return _NAMES[int(np.argmin(((_PALETTE - rgb) ** 2).sum(axis=1)))]


def _pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB"), dtype=float)


def background_color(image: Image.Image) -> str:
    px = _pixels(image)
    border = np.concatenate([px[0], px[-1], px[:, 0], px[:, -1]])
    return nearest_color(np.median(border, axis=0))


def foreground_mask(image: Image.Image) -> np.ndarray:
    """Pixels whose nearest palette color is not the background's."""
    px = _pixels(image)
    nearest = (((px[:, :, None, :] - _PALETTE) ** 2).sum(axis=-1)).argmin(axis=-1)
    return nearest != _NAMES.index(background_color(image))


def foreground_color(image: Image.Image) -> str | None:
    mask = foreground_mask(image)
    if mask.sum() < 4:
        return None
    return nearest_color(np.median(_pixels(image)[mask], axis=0))


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

    def predict(self, image: Image.Image) -> str:
        f = shape_features(foreground_mask(image))
        return min(self.centroids, key=lambda s: float(((self.centroids[s] - f) ** 2).sum()))


@dataclass(frozen=True)
class Verdict:
    color: bool
    background: bool
    shape: bool


def check(image: Image.Image, caption: Caption, shapes: ShapeClassifier) -> Verdict:
    """Whether the image shows the caption's foreground color, background color and shape."""
    return Verdict(
        color=foreground_color(image) == caption.color,
        background=background_color(image) == caption.background,
        shape=shapes.predict(image) == caption.shape,
    )
