"""Measuring the `shape` ControlNet (issue 28): does the image put the prompted shape where its
silhouette is, and keep the prompt's colors?

`eval_cases(n)` draws n held-out (caption, silhouette, seed) triples from
`CONTROLNET_EVAL_SEED`, a seed that training never uses (it draws its triples from
`random.Random(config.seed)`, 0 by default). `evaluate_controlnet` generates each prompt twice
through sdserve's own path (`served.generate_rows`: `TextEncoder`, `Denoiser.make_job` with
`controls=[Control(net, prepare_image(silhouette, 64, 64))]`, one `DenoiseEngine` whose U-Net
forwards mix the rows with and without the net), with the net and without it (the same prompts
and seeds: the chance baseline), and judges each image with the model-independent checker
(`adherence`): the IoU of its foreground (`adherence.foreground_mask`, the pixels whose nearest
palette color is not the background's) with the silhouette, and its foreground and background
colors.
"""

from __future__ import annotations

import random
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from sdserve.shapes.adherence import ShapeClassifier, check, foreground_mask, palette_for
from sdserve.shapes.controlnet_data import iou, mask_of, render_pair
from sdserve.shapes.controlnet_recipe import (
    CONTROLNET_EVAL_PROMPTS,
    CONTROLNET_EVAL_RUN,
    CONTROLNET_EVAL_SEED,
    IOU_THRESHOLD,
)
from sdserve.shapes.recipe import DEFAULT_GUIDANCE
from sdserve.shapes.synthetic import Caption, random_caption


@dataclass(frozen=True)
class EvalCase:
    caption: Caption
    silhouette: Image.Image
    seed: int
    """Image i's noise: `CONTROLNET_EVAL_SEED + i`."""


def eval_cases(n: int = CONTROLNET_EVAL_PROMPTS, size: int = 64) -> list[EvalCase]:
    """The first n held-out cases (the same for every n >= k)."""
    rng = random.Random(CONTROLNET_EVAL_SEED)
    cases = []
    for i in range(n):
        caption = random_caption(rng)
        _, silhouette = render_pair(caption, rng, size)
        cases.append(EvalCase(caption, silhouette, CONTROLNET_EVAL_SEED + i))
    return cases


@dataclass
class GroupResult:
    ious: list[float] = field(default_factory=list)
    colors: list[bool] = field(default_factory=list)
    """Foreground and background colors both right."""
    shapes: list[bool] = field(default_factory=list)

    def summary(self) -> dict:
        n = len(self.ious)
        return {
            "images": n,
            "iou_at_least": IOU_THRESHOLD,
            "share_iou_at_least": round(sum(x >= IOU_THRESHOLD for x in self.ious) / n, 4),
            "median_iou": round(statistics.median(self.ious), 4),
            "mean_iou": round(statistics.fmean(self.ious), 4),
            "colors_right": round(sum(self.colors) / n, 4),
            "shape_right": round(sum(self.shapes) / n, 4),
        }


@dataclass
class ControlNetEvaluation:
    net: str
    sampler: str
    steps: int
    guidance: float
    scale: float
    seconds_per_image: float
    cases: list[EvalCase]
    groups: dict[str, GroupResult] = field(default_factory=dict)
    """"control": with the net; "none": the same prompts and seeds without it."""
    images: dict[str, list[Image.Image]] = field(default_factory=dict)

    def summary(self) -> dict:
        return {"net": self.net, "sampler": self.sampler, "steps": self.steps,
                "guidance": self.guidance, "scale": self.scale,
                "seconds_per_image": round(self.seconds_per_image, 3),
                **{g: r.summary() for g, r in self.groups.items()},
                "misses": self.misses()}  # fmt: skip

    def misses(self) -> list[tuple[str, float]]:
        """(prompt, IoU) of each image with the net below `IOU_THRESHOLD`."""
        ious = self.groups["control"].ious if "control" in self.groups else []
        return [(case.caption.prompt, round(x, 3))
                for case, x in zip(self.cases[: len(ious)], ious, strict=True)
                if x < IOU_THRESHOLD]  # fmt: skip


def judge(image: Image.Image, case: EvalCase, shapes: ShapeClassifier) -> tuple[float, bool,
                                                                                 bool]:  # fmt: skip
    """(IoU of the image's foreground with the silhouette, colors right, shape right)."""
    verdict = check(image, case.caption, shapes)
    fg = foreground_mask(image, palette_for(case.caption))
    return iou(fg, mask_of(case.silhouette)), verdict.color and verdict.background, verdict.shape


def evaluate_controlnet(model_dir: str | Path, net_dir: str | Path, *,
                        n: int = CONTROLNET_EVAL_PROMPTS, scale: float = 1.0,
                        sampler: str = CONTROLNET_EVAL_RUN[0], steps: int = CONTROLNET_EVAL_RUN[1],
                        guidance: float = DEFAULT_GUIDANCE,
                        batch_size: int = 32) -> ControlNetEvaluation:  # fmt: skip
    """n held-out cases with the net in `net_dir` and without it, in the same engine batches."""
    from sdserve.pipeline.controlnet import Control, check_fits, load_controlnet, prepare_image
    from sdserve.shapes.served import ServedParts, generate_rows

    parts = ServedParts.load(model_dir)
    denoiser = parts.denoiser
    net = load_controlnet(net_dir, denoiser.device, denoiser.dtype)
    check_fits(net, denoiser.unet, Path(net_dir).name)
    width, height = denoiser.native_size
    cases = eval_cases(n)
    rows = []
    for case in cases:
        control = Control(net, prepare_image(case.silhouette, width, height), scale)
        rows += [(case.caption.prompt, case.seed, (), (control,)),
                 (case.caption.prompt, case.seed, (), ())]  # fmt: skip
    started = time.perf_counter()
    images, _, _ = generate_rows(parts, rows, sampler=sampler, steps=steps, guidance=guidance,
                                 batch_size=batch_size)  # fmt: skip
    result = ControlNetEvaluation(str(net_dir), sampler, steps, guidance, scale,
                                  (time.perf_counter() - started) / len(rows), cases)  # fmt: skip
    shapes = ShapeClassifier.fit()
    for k, group in enumerate(("control", "none")):
        result.images[group] = images[k::2]
        result.groups[group] = GroupResult()
        for image, case in zip(result.images[group], cases, strict=True):
            for values, value in zip(vars(result.groups[group]).values(),
                                     judge(image, case, shapes), strict=True):  # fmt: skip
                values.append(value)
    return result


GROUP_NAMES = {"control": "with the `shape` ControlNet", "none": "without it (chance)"}


def controlnet_table(result: ControlNetEvaluation) -> str:
    """A markdown table of both groups."""
    lines = [
        f"| {result.sampler} {result.steps} steps, guidance {result.guidance:g}, scale "
        f"{result.scale:g} | images | IoU >= {IOU_THRESHOLD:g} | median IoU | mean IoU "
        "| colors right | shape right |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for group, r in result.groups.items():
        s = r.summary()
        lines.append(f"| {GROUP_NAMES[group]} | {s['images']} | **{s['share_iou_at_least']:.1%}**"
                     f" | {s['median_iou']:.3f} | {s['mean_iou']:.3f} | {s['colors_right']:.1%}"
                     f" | {s['shape_right']:.1%} |")  # fmt: skip
    return "\n".join(lines)
