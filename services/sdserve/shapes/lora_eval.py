"""Prompt adherence of an adapter of the default model, through sdserve's own per-row path
(issue 17).

Unlike `evaluate.py` (diffusers' pipeline, the base weights alone), the images here are made
the way the server makes them: `TextEncoder.encode(..., loras=...)`, `Denoiser.make_job(...,
loras=...)` and one `DenoiseEngine`, which batches every request's rows into the same U-Net
forwards, each row with its own adapters (`lora.rows`). Four groups of single-image requests are
interleaved, so that every batch holds rows with and without the adapter:

- (a) `new+lora`: held-out prompts with the new color (as the shape's color in half of them, as
  the background in the others), WITH the adapter: the share judged the new color where the
  prompt puts it;
- (b) `base-lora`: ordinary prompts of the 8 colors WITHOUT it: the share with both colors right;
- (c) `new-lora`: the prompts of (a), same seeds, WITHOUT the adapter: judged the new color;
- (d) `base+lora`: the prompts of (b) WITH the adapter (for information).

The prompts with the new color are `lora_recipe.held_out_captions` (issue 28): 64 of the 144
the grammar has with the color, which `train-lora` leaves out of its data, the new color as the
shape's color and as the background in turn, every other color 4 times on each side, shapes and
size words balanced, none of them one of issue 17's evaluation prompts (`retired_captions`,
also left out of the training). (a) and (c) are scored on each side apart too: the background
side is the easy one, and issue 17's single score averaged it with the other. The ordinary
prompts are seeded with `recipe.EVAL_SEED`; image i of every group starts from the noise of
seed `LORA_EVAL_SEED + i` (issue 17's used `EVAL_SEED + i`).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from sdserve.pipeline.lora_files import WEIGHTS, lora_dir, lora_files
from sdserve.shapes.adherence import ShapeClassifier, background_color, check, foreground_color
from sdserve.shapes.evaluate import eval_captions
from sdserve.shapes.lora_recipe import (
    LORA_EVAL_BATCH,
    LORA_EVAL_PROMPTS,
    LORA_EVAL_RUN,
    LORA_EVAL_SEED,
    held_out_captions,
)
from sdserve.shapes.recipe import DEFAULT_GUIDANCE
from sdserve.shapes.served import generate_rows
from sdserve.shapes.synthetic import Caption

GROUPS = {
    "new+lora": "(a) new color, with the adapter: judged the new color",
    "base-lora": "(b) 8 colors, without it (same batches): both colors right",
    "new-lora": "(c) new color, without the adapter: judged the new color",
    "base+lora": "(d) 8 colors, with the adapter (information): both colors right",
}


@dataclass(frozen=True)
class GroupResult:
    group: str
    images: int
    score: float
    """(a), (c): the share judged the new color where the prompt puts it; (b), (d): the share
    with the foreground and the background color both right."""
    color: float
    background: float
    shape: float
    new_color_anywhere: float
    """The share in which the checker, knowing every color, sees the new color as the
    foreground or the background (for (b) and (d): how often the new color leaks)."""
    as_shape: float | None = None
    """(a), (c): the score over the prompts with the new color as the shape's color."""
    as_background: float | None = None
    """(a), (c): the score over the prompts with the new color as the background."""


@dataclass
class LoraEvaluation:
    adapter: str
    color: str
    scale: float
    sampler: str
    steps: int
    guidance: float
    groups: dict[str, GroupResult] = field(default_factory=dict)
    forwards: int = 0
    mixed_forwards: int = 0
    """U-Net forwards whose batch held rows with the adapter and rows without it."""
    seconds_per_image: float = 0.0
    images: dict[str, list] = field(default_factory=dict, repr=False)
    """The images of each group, in prompt order."""
    captions: list[Caption] = field(default_factory=list, repr=False)
    """The prompts with the new color (of groups (a) and (c)), in order."""

    def summary(self) -> dict:
        """What a JSON report holds (no images)."""
        keep = ("adapter", "color", "scale", "sampler", "steps", "guidance", "forwards",
                "mixed_forwards", "seconds_per_image")  # fmt: skip
        out = {k: getattr(self, k) for k in keep}
        out["groups"] = {g: asdict(r) for g, r in self.groups.items()}
        return out


def resolve_lora(name: str, model_dir: str | Path) -> Path:
    """An adapter file: `name` as a file, an adapter folder (as `loras/` holds them), or the
    name of one of the model's own adapters (the default model ships `cyan`)."""
    path = Path(name)
    if path.is_file():
        return path
    if path.is_dir() and path.name in lora_files(path.parent):
        return lora_files(path.parent)[path.name]
    own = lora_files(lora_dir(model_dir))
    if name in own:
        return own[name]
    raise FileNotFoundError(f"no LoRA {name!r}: neither a file, nor an adapter folder, nor one "
                            f"of {lora_dir(model_dir)} ({', '.join(own) or 'none'})")  # fmt: skip


def _group_result(group: str, color: str, captions: list[Caption], images,
                  shapes: ShapeClassifier) -> GroupResult:  # fmt: skip
    verdicts = [check(image, c, shapes) for image, c in zip(images, captions, strict=True)]
    n = len(verdicts)
    if group.startswith("new"):
        hits = [v.background if c.background == color else v.color
                for v, c in zip(verdicts, captions, strict=True)]  # fmt: skip
    else:
        hits = [v.color and v.background for v in verdicts]
    anywhere = [color in (foreground_color(image), background_color(image)) for image in images]
    sides = {}
    if group.startswith("new"):
        for side, on_shape in (("as_shape", True), ("as_background", False)):
            mine = [
                h for h, c in zip(hits, captions, strict=True) if (c.color == color) == on_shape
            ]
            sides[side] = sum(mine) / len(mine) if mine else None
    return GroupResult(group, n, sum(hits) / n, sum(v.color for v in verdicts) / n,
                       sum(v.background for v in verdicts) / n,
                       sum(v.shape for v in verdicts) / n, sum(anywhere) / n, **sides)  # fmt: skip


def evaluate_lora(model_dir: str | Path, lora: str | Path, *, color: str, scale: float = 1.0,
                  n: int = LORA_EVAL_PROMPTS, sampler: str = LORA_EVAL_RUN[0],
                  steps: int = LORA_EVAL_RUN[1], guidance: float = DEFAULT_GUIDANCE,
                  batch_size: int = LORA_EVAL_BATCH, **knobs) -> LoraEvaluation:  # fmt: skip
    """The four groups (module docstring) for the adapter file `lora`, `n` prompts each."""
    from sdserve.pipeline.lora import load_lora
    from sdserve.shapes.served import ServedParts

    parts = ServedParts.load(model_dir)
    path = Path(lora)
    name = path.parent.name if path.name == WEIGHTS else path.stem
    adapter = load_lora(path, name, parts.denoiser.unet, parts.text.model)
    loras = ((adapter, scale),)
    captions = {"new": held_out_captions(color, n), "base": eval_captions(n)}
    groups = {g: (captions[g[:-5]], loras if g.endswith("+lora") else ()) for g in GROUPS}
    rows = [(groups[g][0][i].prompt, LORA_EVAL_SEED + i, groups[g][1])
            for i in range(n) for g in GROUPS]  # fmt: skip
    started = time.perf_counter()
    images, forwards, mixed = generate_rows(parts, rows, sampler=sampler, steps=steps,
                                            guidance=guidance, batch_size=batch_size,
                                            **knobs)  # fmt: skip
    result = LoraEvaluation(str(lora), color, scale, sampler, steps, guidance, forwards=forwards,
                            mixed_forwards=mixed,
                            seconds_per_image=(time.perf_counter() - started) / len(rows),
                            captions=captions["new"])  # fmt: skip
    shapes = ShapeClassifier.fit()
    for k, g in enumerate(GROUPS):
        result.groups[g] = _group_result(g, color, groups[g][0], images[k :: len(GROUPS)], shapes)
        result.images[g] = images[k :: len(GROUPS)]
    return result


def lora_table(result: LoraEvaluation) -> str:
    """A markdown table of the four groups; (a) and (c)'s score on each side apart too."""
    lines = [
        f"| group ({result.sampler} {result.steps} steps, guidance {result.guidance:g}, "
        f"adapter scale {result.scale:g}) | images | score | {result.color} as the shape's "
        f"color | {result.color} as the background | foreground color | background color "
        f"| shape | {result.color} seen |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for g, r in result.groups.items():
        sides = " | ".join("" if x is None else f"{x:.1%}" for x in (r.as_shape, r.as_background))
        shares = (r.color, r.background, r.shape, r.new_color_anywhere)
        lines.append(f"| {GROUPS[g]} | {r.images} | **{r.score:.1%}** | {sides} | "
                     + " | ".join(f"{x:.1%}" for x in shares) + " |")  # fmt: skip
    return "\n".join(lines)
