"""ControlNet per row of the step batch: loading nets, preparing control images, residuals.

A request's `controls` are (net, image, scale, start, end, guess mode) entries; several entries
are diffusers' MultiControlNet (their residuals add up). At each step `residuals` runs each
net ONCE over the batch rows that use it at that step, and adds its residuals into those rows
only; rows without control get zeros, which leave the U-Net's forward unchanged. It follows
`StableDiffusionControlNetPipeline.__call__` (and its SDXL sibling), row by row:

- the net sees the same (scaled) latents, timestep and text embeddings as the U-Net's row, and
  for SDXL its added conditions;
- an entry is active at step i of n unless i / n < start or (i + 1) / n > end
  (`control_guidance_start` / `_end`);
- guess mode runs the net on the conditional row only (the unconditional row gets zeros) and
  scales its residuals from 0.1 (shallowest) to 1 (the middle block), times the entry's scale.

The nets' weights are never changed and hold no per-request state, so any mix of nets, images
and scales shares the U-Net's forward.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import numpy as np
import torch
from PIL import Image

from sdserve.pipeline import models

if TYPE_CHECKING:
    from diffusers import ControlNetModel

logger = logging.getLogger(__name__)

CONTROLNET_DIR = "controlnets"
"""The folder beside a model's parts that holds its ControlNets, one diffusers folder each."""


@dataclass(frozen=True, eq=False)
class Control:
    """One control of a request (an entry of diffusers' MultiControlNet lists)."""

    net: ControlNetModel
    """Loaded for the U-Net it conditions (`load_controlnet`, `check_fits`)."""
    image: torch.Tensor
    """(1, 3, height, width) float32 in [0, 1] at the output size (`prepare_image`)."""
    scale: float = 1.0
    """`controlnet_conditioning_scale`."""
    start: float = 0.0
    """`control_guidance_start`: the fraction of the steps before which it is off."""
    end: float = 1.0
    """`control_guidance_end`: the fraction of the steps after which it is off."""
    guess_mode: bool = False

    def active(self, index: int, steps: int) -> bool:
        """Whether it conditions step `index` of `steps` (diffusers' `controlnet_keep`)."""
        return not (index / steps < self.start or (index + 1) / steps > self.end)


def controlnet_dir(model_dir: str | Path, configured: str | None = None) -> Path:
    """A model's ControlNet folder: `configured` (relative to the model) or `controlnets/`."""
    return Path(model_dir) / (configured or CONTROLNET_DIR)


def controlnet_folders(folder: str | Path) -> dict[str, Path]:
    """{name: folder} of every ControlNet in `folder` (a subfolder with a config.json), sorted."""
    folder = Path(folder)
    if not folder.is_dir():
        return {}
    return {p.name: p for p in sorted(folder.iterdir()) if (p / "config.json").is_file()}


def load_controlnet(path: str | Path, device: torch.device, dtype: torch.dtype, *,
                    allow_pickle: bool = False) -> ControlNetModel:  # fmt: skip
    """A diffusers `ControlNetModel` folder, on `device` in `dtype`, in eval mode.

    Raises:
        ValueError: the folder is not a ControlNet (its config's class), its weights are not
            safetensors (unless `allow_pickle`), or it pools its conditions globally (the
            "shuffle" kind, not supported).
    """
    from diffusers import ControlNetModel

    path = Path(path)
    config = models.read_config(path.parent, path.name)
    if config.get("_class_name", "ControlNetModel") != "ControlNetModel":
        raise ValueError(f"{path} holds a {config['_class_name']}, not a ControlNetModel")
    if config.get("global_pool_conditions"):
        raise ValueError(f"{path}: ControlNets that pool their conditions globally are not "
                         "supported")  # fmt: skip
    if not any(path.glob("*.safetensors")) and not allow_pickle:
        raise ValueError(f"{path} has no safetensors weights; sdserve does not unpickle "
                         "weights unless the model's config says allow_pickle: true")  # fmt: skip
    return models.load_part(ControlNetModel, path.parent, path.name, device, dtype, allow_pickle)


def check_fits(net: ControlNetModel, unet, name: str) -> None:
    """Raises ValueError unless `net` conditions this U-Net: the same text width, block
    widths and (SDXL) added conditioning, i.e. a ControlNet of the same model family."""
    net_config, unet_config = net.config, unet.config
    keys = ("cross_attention_dim", "block_out_channels", "addition_embed_type")
    mismatched = [k for k in keys if _norm(net_config.get(k)) != _norm(unet_config.get(k))]
    if mismatched:
        found = ", ".join(f"{k} {net_config.get(k)!r} (the U-Net's: {unet_config.get(k)!r})"
                          for k in mismatched)  # fmt: skip
        raise ValueError(f"ControlNet {name!r} is for another model family: {found}")


def _norm(value):
    return tuple(value) if isinstance(value, list | tuple) else value


def prepare_image(image: Image.Image, width: int, height: int) -> torch.Tensor:
    """A control image as diffusers' ControlNet pipelines prepare it
    (`VaeImageProcessor(do_convert_rgb=True, do_normalize=False).preprocess`): RGB, resized to
    the output size (Lanczos), in [0, 1]: (1, 3, height, width) float32."""
    image = image.convert("RGB")
    if image.size != (width, height):
        image = image.resize((width, height), resample=Image.Resampling.LANCZOS)
    pixels = np.asarray(image, dtype=np.float32) / 255.0
    return torch.from_numpy(pixels).permute(2, 0, 1).unsqueeze(0).contiguous()


class Controlled(Protocol):
    """What `residuals` reads of a sample (`sample.Sample`)."""

    controls: tuple[Control, ...]
    index: int
    timesteps: torch.Tensor


Residuals = tuple[list[torch.Tensor], torch.Tensor]
"""(down-block residuals, mid-block residual) for every row of a U-Net forward."""


@dataclass(frozen=True)
class _Use:
    row: int
    """The row of the U-Net's batch."""
    sample: Controlled
    control: Control


def _uses(guided: Sequence[Controlled], samples: Sequence[Controlled]) -> list[_Use]:
    """Every (row, control) pair active at this step, in the forward's row order
    [uncond rows of `guided`..., cond rows of `samples`...]. Guess mode leaves the
    unconditional row out."""
    uncond_row = {id(s): i for i, s in enumerate(guided)}
    uses = []
    for j, sample in enumerate(samples):
        steps = len(sample.timesteps)
        for control in sample.controls:
            if not control.active(sample.index, steps):
                continue
            i = uncond_row.get(id(sample))
            if i is not None and not control.guess_mode:
                uses.append(_Use(i, sample, control))
            uses.append(_Use(len(guided) + j, sample, control))
    return uses


def residuals(guided: Sequence[Controlled], samples: Sequence[Controlled], x: torch.Tensor,
              timesteps: torch.Tensor, context: torch.Tensor,
              added: dict | None) -> Residuals | None:  # fmt: skip
    """The ControlNet residuals of a forward's rows, or None when no row uses a ControlNet at
    this step (the U-Net's forward is then the plain one).

    `x` is the forward's latent input (its first 4 channels: an inpainting U-Net's mask
    channels are not the nets'), `timesteps`, `context` and `added` its per-row inputs, in the
    row order of `step._forward`. Each net runs once over the rows that use it."""
    uses = _uses(guided, samples)
    if not uses:
        return None
    by_net: dict[int, list[_Use]] = {}
    for use in uses:
        by_net.setdefault(id(use.control.net), []).append(use)
    down: list[torch.Tensor] | None = None
    mid: torch.Tensor | None = None
    for group in by_net.values():
        net = group[0].control.net
        idx = torch.tensor([u.row for u in group], device=x.device)
        net_added = None if added is None else {k: v[idx] for k, v in added.items()}
        image = torch.cat([u.control.image for u in group]).to(x.device, net.dtype)
        net_down, net_mid = net(
            x[idx, : net.config.in_channels], timesteps[idx], encoder_hidden_states=context[idx],
            controlnet_cond=image, conditioning_scale=1.0, added_cond_kwargs=net_added,
            return_dict=False,
        )  # fmt: skip
        factors = _factors(group, len(net_down) + 1, x.device)  # (rows, levels)
        if down is None:
            down = [x.new_zeros((x.shape[0], *r.shape[1:]), dtype=r.dtype) for r in net_down]
            mid = x.new_zeros((x.shape[0], *net_mid.shape[1:]), dtype=net_mid.dtype)
        for k, r in enumerate(net_down):
            down[k].index_add_(0, idx, r * _per_row(factors[:, k], r))
        mid.index_add_(0, idx, net_mid * _per_row(factors[:, -1], net_mid))
    return down, mid


def _factors(group: list[_Use], levels: int, device: torch.device) -> torch.Tensor:
    """Each use's scale per residual level, as `ControlNetModel.forward` scales them:
    the entry's scale at every level, or in guess mode logspace(-1, 0) times it."""
    guess = torch.logspace(-1, 0, levels, device=device)
    rows = [guess * u.control.scale if u.control.guess_mode
            else torch.full((levels,), u.control.scale, device=device) for u in group]  # fmt: skip
    return torch.stack(rows)


def _per_row(factor: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A (rows,) factor shaped to multiply a (rows, C, h, w) residual, in its dtype."""
    return factor.to(like.dtype).view(-1, *([1] * (like.dim() - 1)))
