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
EXTRA_COLORS: dict[str, tuple[int, int, int]] = {
    "cyan": (40, 140, 140),
}
"""Colors the default model was NOT trained on, for adapters that teach them (issue 17; the
`cyan` LoRA in `default_model/loras/cyan/`). Opt-in: `random_caption(..., colors=ALL_COLORS)`,
`parse_prompt(..., colors=ALL_COLORS)`; the base model's grammar stays the 8 `COLORS`.

Cyan is a dark cyan written in the palette's convention (the "off" channel at 40, as in red,
green and blue). The default model's VAE, trained on the 8 colors only, cannot decode a brighter
cyan: its decoder's closest reach to (0, 190, 200) is about (34, 117, 153), and the cyans it
decodes keep red near 40, as its blues and greens do."""
ALL_COLORS: dict[str, tuple[int, int, int]] = {**COLORS, **EXTRA_COLORS}
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


def _prompt_pattern(colors) -> re.Pattern:
    names = "|".join(colors)
    return re.compile(rf"a (?:({'|'.join(SIZE_WORDS)}) )?({names}) ({'|'.join(SHAPES)}) "
                      rf"on a ({names}) background")  # fmt: skip


def parse_prompt(prompt: str, colors: dict | None = None) -> Caption | None:
    """The caption a prompt of the grammar spells, or None for any other text. `colors`: the
    color names it may use (default: the 8 `COLORS`; `ALL_COLORS` adds `EXTRA_COLORS`)."""
    pattern = _PROMPT if colors is None else _prompt_pattern(colors)
    match = pattern.fullmatch(" ".join(prompt.lower().split()))
    if not match or match[2] == match[4]:
        return None
    return Caption(color=match[2], shape=match[3], background=match[4], size_word=match[1])


def random_caption(rng: random.Random, *, size_word_p: float = 0.5,
                   colors: dict | None = None) -> Caption:  # fmt: skip
    """A caption drawn uniformly from the grammar (size word present with `size_word_p`);
    `colors`: the color names to draw from (default: the 8 `COLORS`)."""
    color, background = rng.sample(sorted(colors or COLORS), 2)
    size_word = rng.choice(sorted(SIZE_WORDS)) if rng.random() < size_word_p else None
    return Caption(color, rng.choice(SHAPES), background, size_word)


def caption_with(rng: random.Random, color: str, *, as_background: bool,
                 size_word_p: float = 0.5) -> Caption:  # fmt: skip
    """A caption with `color` (e.g. an `EXTRA_COLORS` one) as the background when
    `as_background`, else as the shape's color; the other color is one of the 8 `COLORS`."""
    other = rng.choice(sorted(c for c in COLORS if c != color))
    size_word = rng.choice(sorted(SIZE_WORDS)) if rng.random() < size_word_p else None
    shape = rng.choice(SHAPES)
    if as_background:
        return Caption(other, shape, color, size_word)
    return Caption(color, shape, other, size_word)


def captions_with(color: str, *, as_background: bool) -> list[Caption]:
    """Every caption of the grammar with `color` as the background (`as_background`) or as the
    shape's color, the other color one of the 8 `COLORS`, in a fixed order."""
    return [Caption(other, shape, color, size) if as_background else
            Caption(color, shape, other, size)
            for other in sorted(c for c in COLORS if c != color) for shape in SHAPES
            for size in (None, *sorted(SIZE_WORDS))]  # fmt: skip


def placement(caption: Caption, rng: random.Random, size: int = 64) -> tuple[float, float, float]:
    """(cx, cy, extent) in pixels of the caption's shape, drawn from `rng` as `render` draws
    them: an extent within its size word's range (or any), then a center that keeps it inside."""
    lo, hi = SIZE_WORDS.get(caption.size_word or "", (0.28, 0.7))
    extent = rng.uniform(lo, hi) * size
    margin = extent / 2 + 1
    cx, cy = rng.uniform(margin, size - margin), rng.uniform(margin, size - margin)
    return cx, cy, extent


def draw_shape(image: Image.Image, shape: str, cx: float, cy: float, extent: float,
               fill) -> Image.Image:  # fmt: skip
    """Draws `shape` centered at (cx, cy), `extent` pixels wide, into `image` (and returns it);
    squares and triangles without rotation."""
    draw = ImageDraw.Draw(image)
    r = extent / 2
    if shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif shape == "square":
        draw.rectangle([cx - r, cy - r, cx + r, cy + r], fill=fill)
    else:  # an upward equilateral triangle whose width is `extent`
        h = extent * math.sqrt(3) / 2
        draw.polygon([(cx, cy - h / 2), (cx - r, cy + h / 2), (cx + r, cy + h / 2)], fill=fill)
    return image


def render(caption: Caption, rng: random.Random, size: int = 64) -> Image.Image:
    """The caption's picture: its shape at a random extent (within its size word's range, or
    any), position and, for squares and triangles, without rotation (`placement`)."""
    image = Image.new("RGB", (size, size), ALL_COLORS[caption.background])
    return draw_shape(image, caption.shape, *placement(caption, rng, size),
                      ALL_COLORS[caption.color])  # fmt: skip


def dataset(n: int, seed: int = 0, size: int = 64) -> list[tuple[Caption, Image.Image]]:
    """n (caption, image) pairs; the same seed gives the same pairs."""
    rng = random.Random(seed)
    pairs = []
    for _ in range(n):
        caption = random_caption(rng)
        pairs.append((caption, render(caption, rng, size)))
    return pairs
