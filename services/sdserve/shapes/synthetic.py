"""A seeded synthetic captioned dataset: one shape on a plain background, drawn with PIL.

Prompts follow `a [small |large ]{color} {shape} on a {background} background`, with the
shape's color and the background always different. It is what the default model is trained on
(issue 6) and what the adherence checker (`pipeline/adherence.py`) is calibrated on; the
checker never sees a generated image while it is fitted.
"""

from __future__ import annotations

import math
import random
import re
from dataclasses import dataclass

from PIL import Image, ImageDraw

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 70, 220),
    "yellow": (235, 215, 40),
    "purple": (140, 50, 170),
    "orange": (245, 140, 30),
    "white": (245, 245, 245),
    "black": (15, 15, 15),
}
SHAPES = ("circle", "square", "triangle")
SIZE_WORDS = {"small": (0.28, 0.38), "large": (0.55, 0.7)}
"""Size word -> range of the shape's extent, as a fraction of the image side."""


@dataclass(frozen=True)
class Caption:
    color: str
    shape: str
    background: str
    size_word: str | None = None

    @property
    def prompt(self) -> str:
        size = f"{self.size_word} " if self.size_word else ""
        return f"a {size}{self.color} {self.shape} on a {self.background} background"


_PROMPT = re.compile(
    rf"a (?:({'|'.join(SIZE_WORDS)}) )?({'|'.join(COLORS)}) ({'|'.join(SHAPES)}) "
    rf"on a ({'|'.join(COLORS)}) background"
)


def parse_prompt(prompt: str) -> Caption | None:
    """The caption a prompt of the grammar spells, or None for any other text."""
    match = _PROMPT.fullmatch(" ".join(prompt.lower().split()))
    if not match or match[2] == match[4]:
        return None
    return Caption(color=match[2], shape=match[3], background=match[4], size_word=match[1])


def random_caption(rng: random.Random, *, size_word_p: float = 0.5) -> Caption:
    """A caption drawn uniformly from the grammar (size word present with `size_word_p`)."""
    color, background = rng.sample(sorted(COLORS), 2)
    size_word = rng.choice(sorted(SIZE_WORDS)) if rng.random() < size_word_p else None
    return Caption(color, rng.choice(SHAPES), background, size_word)


def render(caption: Caption, rng: random.Random, size: int = 64) -> Image.Image:
    """The caption's picture: its shape at a random extent (within its size word's range, or
    any), position and, for squares and triangles, without rotation."""
    lo, hi = SIZE_WORDS.get(caption.size_word or "", (0.28, 0.7))
    extent = rng.uniform(lo, hi) * size
    margin = extent / 2 + 1
    cx, cy = rng.uniform(margin, size - margin), rng.uniform(margin, size - margin)
    image = Image.new("RGB", (size, size), COLORS[caption.background])
    draw = ImageDraw.Draw(image)
    fill = COLORS[caption.color]
    r = extent / 2
    if caption.shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif caption.shape == "square":
        draw.rectangle([cx - r, cy - r, cx + r, cy + r], fill=fill)
    else:  # an upward equilateral triangle whose width is `extent`
        h = extent * math.sqrt(3) / 2
        draw.polygon([(cx, cy - h / 2), (cx - r, cy + h / 2), (cx + r, cy + h / 2)], fill=fill)
    return image


def dataset(n: int, seed: int = 0, size: int = 64) -> list[tuple[Caption, Image.Image]]:
    """n (caption, image) pairs; the same seed gives the same pairs."""
    rng = random.Random(seed)
    pairs = []
    for _ in range(n):
        caption = random_caption(rng)
        pairs.append((caption, render(caption, rng, size)))
    return pairs
