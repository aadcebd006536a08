"""The `shape` ControlNet's model card (README.md beside its weights), written by
`sdserve train-controlnet` from what it measured."""

from __future__ import annotations

import textwrap

from sdserve.shapes.controlnet_recipe import CONTROLNET_EVAL_SEED, IOU_THRESHOLD


def _wrap(text: str, indent: str = "") -> str:
    return textwrap.fill(text, width=96, subsequent_indent=indent)


def recipe(report: dict) -> str:
    """The card's paragraph on how the net was trained."""
    config = report["config"]
    minutes = (report["data_seconds"] + report["train_seconds"]) / 60
    stopped = (f" **Interrupted (Ctrl-C) after {report['steps_done']} of {config['steps']} "
               "steps.**" if report["interrupted"] else "")  # fmt: skip
    channels = ", ".join(map(str, config["conditioning_channels"]))
    return (
        f"`diffusers.ControlNetModel.from_unet` of the default model's U-Net (a copy of its "
        f"encoder half, its output zero convolutions at zero; {report['parameters'] / 1e6:.2f} M "
        f"parameters), its control-image encoder with channels ({channels}): two stride-2 "
        "steps, 64x64 pixels to the 16x16 latents; that encoder's last convolution starts at "
        "random, not at zero as diffusers starts it (with both at zero, 300 steps changed "
        "nothing: IoU 0.22 with and without the net). "
        f"{report['steps_done']} steps of AdamW (lr {config['lr']:g}, {config['warmup_steps']} "
        f"warm-up steps, cosine), batch {config['batch_size']}, on {config['samples']:,} seeded "
        f"synthetic triples (seed {config['seed']}: caption, picture, silhouette of its shape), "
        "the U-Net, text encoder and VAE frozen; the base model's loss: DDPM's epsilon "
        f"prediction on the VAE's latents, Min-SNR-{config['snr_gamma']:g} weighting, "
        f"{config['uncond_p']:.0%} empty prompts. The latents were encoded once "
        f"({report['data_seconds']} s), the training took {report['train_seconds']} s "
        f"({report['seconds_per_step']} s/step; {minutes:.0f} minutes in all) on "
        f"{report['threads']} CPU thread{'s' * (report['threads'] > 1)}, torch "
        f"{report['torch']}.{stopped}"
    )


def misses(summary: dict) -> str:
    """The Limits line on the images with the net below the threshold."""
    found = summary.get("misses", [])
    if not found:
        return f"- Every image with the net reached IoU >= {IOU_THRESHOLD:g}."
    listed = "; ".join(f'"{prompt}" ({x:.2f})' for prompt, x in found)
    return _wrap(f"- The {len(found)} of {summary['control']['images']} images with the net "
                 f"below IoU {IOU_THRESHOLD:g}: {listed}.", "  ")  # fmt: skip


def figures(summary: dict) -> str:
    """One sentence of the must-show numbers of an evaluation summary."""
    c, n = summary["control"], summary["none"]
    return (f"With the net, {c['share_iou_at_least']:.1%} of {c['images']} images overlap their "
            f"silhouette with IoU >= {IOU_THRESHOLD:g} (median IoU {c['median_iou']:.3f}), and "
            f"{c['colors_right']:.1%} keep both of the prompt's colors; without it, the same "
            f"prompts and seeds reach IoU >= {IOU_THRESHOLD:g} in {n['share_iou_at_least']:.1%} "
            f"(median IoU {n['median_iou']:.3f}: chance), colors right in "
            f"{n['colors_right']:.1%}.")  # fmt: skip


def card(report: dict, train_command: str, table: str | None, summary: dict | None,
         eval_command: str) -> str:  # fmt: skip
    """The README.md of a trained net: recipe, measured figures, commands."""
    measured = (f"{_wrap(figures(summary))}\n\n{table}" if table and summary else
                "Not measured yet: run the command below.")  # fmt: skip
    return f"""# `shape`: the default model's own ControlNet

A ControlNet for sdserve's built-in default model (`sdserve-shapes-64`): the control image is a
white silhouette on black, 64x64, and the picture puts the prompted shape there, in the
prompted colors. The prompt says which shape and colors; the silhouette says where, how big and
its outline.

    sdserve shape-silhouette circle --at 0.3,0.6 --extent 0.4 where.png
    sdserve generate "a red circle on a blue background" --control shape=where.png

## How it was made

    {train_command}

{_wrap(recipe(report) + " `training.json` has the config and timings.")}

## What it does

Measured on held-out prompts, silhouettes and noise seeds (drawn from seed {CONTROLNET_EVAL_SEED:,};
the training's from seed {report["config"]["seed"]}, `controlnet_recipe.py`), through
sdserve's own path (`TextEncoder`, `Denoiser.make_job` with the net as a `Control`, one
`DenoiseEngine`), each prompt with and without the net in the same batches. The checker is the
default model's model-independent one (`sdserve/shapes/adherence.py`): the foreground is the
pixels whose nearest palette color is not the background's, and its IoU with the silhouette is
measured; colors right means both the foreground and the background color.

{measured}

Re-measure (about two minutes on one CPU thread):

    {eval_command}

## Limits

- It knows the default model's grammar and 64x64 images only; the silhouette should be one
  shape of the grammar (circle, square, upward triangle), white on black, and its shape the
  prompt's: the net was never trained on a silhouette that disagrees with its prompt.
{misses(summary) if summary else ""}

License: Apache-2.0, as sdserve.
"""
