"""The `shape` ControlNet's data: per synthetic sample, the silhouette of exactly the drawn shape.

The control image is the shape's silhouette, white (255) on black (0), at the image's size: the
prompt says which shape and colors, the silhouette where, how big and its outline. It is drawn
with the same placement (`synthetic.placement`) and the same PIL drawing (`synthetic.draw_shape`)
as the picture, so its mask is the picture's foreground pixel for pixel.
"""

from __future__ import annotations

import random

import numpy as np
from PIL import Image

from sdserve.shapes.synthetic import (
    ALL_COLORS,
    Caption,
    draw_shape,
    placement,
    random_caption,
)

WHITE = (255, 255, 255)


def silhouette(shape: str, cx: float, cy: float, extent: float, size: int = 64) -> Image.Image:
    """A white `shape` centered at (cx, cy) pixels, `extent` pixels wide, on black (RGB)."""
    return draw_shape(Image.new("RGB", (size, size)), shape, cx, cy, extent, WHITE)


Pair = tuple[Image.Image, Image.Image]


def render_pair(caption: Caption, rng: random.Random, size: int = 64) -> Pair:
    """The caption's picture (as `synthetic.render` draws it from the same `rng` state) and the
    silhouette of its shape."""
    where = placement(caption, rng, size)
    image = Image.new("RGB", (size, size), ALL_COLORS[caption.background])
    draw_shape(image, caption.shape, *where, ALL_COLORS[caption.color])
    return image, silhouette(caption.shape, *where, size)


def pairs(n: int, seed: int, size: int = 64) -> list[tuple[Caption, Image.Image, Image.Image]]:
    """n seeded (caption, image, silhouette) triples; the same seed gives the same triples."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        caption = random_caption(rng)
        out.append((caption, *render_pair(caption, rng, size)))
    return out


def mask_of(silhouette_image: Image.Image) -> np.ndarray:
    """The silhouette's pixels (brighter than mid-gray), (size, size) bool."""
    return np.asarray(silhouette_image.convert("L")) > 127


def iou(a: np.ndarray, b: np.ndarray) -> float:
    """Intersection over union of two bool masks (1.0 when both are empty)."""
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 1.0
