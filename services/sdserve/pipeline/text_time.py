"""SDXL's added conditioning: pooled text embeddings and size conditioning per image
(`added_cond_kwargs`), and how to tell a U-Net that takes it."""

from __future__ import annotations

from dataclasses import dataclass

import torch


def takes_text_time(unet) -> bool:
    """An SDXL U-Net: it takes pooled text embeddings and size conditioning per row."""
    return unet.config.addition_embed_type == "text_time"


def pooled_width(unet) -> int:
    """The width of the pooled text embeddings an SDXL U-Net takes (its `add_embedding` input
    less the six embedded size numbers): the second text encoder's projection_dim."""
    config = unet.config
    return config.projection_class_embeddings_input_dim - 6 * config.addition_time_embed_dim


def time_ids(width: int, height: int, *, dtype: torch.dtype, device) -> torch.Tensor:
    """SDXL's size conditioning as diffusers' defaults make it: original size = target size =
    (height, width), crop top-left (0, 0). Shape (1, 6)."""
    return torch.tensor([[height, width, 0, 0, height, width]], dtype=dtype, device=device)


@dataclass(frozen=True)
class TextTime:
    """SDXL's added conditioning of one image: its rows' `added_cond_kwargs`.

    Attributes:
        pooled: the prompt's pooled text embeddings (`text_embeds`), shape (1, projection_dim).
        uncond_pooled: the negative prompt's, same shape, or None without guidance.
        time_ids: `time_ids(width, height)`, shape (1, 6); the unconditional row's too, as in
            diffusers without negative sizes.
    """

    pooled: torch.Tensor
    uncond_pooled: torch.Tensor | None
    time_ids: torch.Tensor

    @classmethod
    def for_unet(cls, unet, pooled, uncond_pooled, *, guided: bool, width: int,
                 height: int) -> TextTime | None:  # fmt: skip
        """An image's `TextTime` for an SDXL U-Net (None for other U-Nets), in its dtype.

        Raises:
            ValueError: `pooled` (or with guidance `uncond_pooled`) is missing, or its width is
                not the one the U-Net takes.
        """
        if not takes_text_time(unet):
            return None
        if pooled is None or (guided and uncond_pooled is None):
            raise ValueError("an SDXL U-Net needs the pooled text embeddings (pooled, and "
                             "uncond_pooled with guidance)")  # fmt: skip
        if pooled.shape[-1] != pooled_width(unet):
            raise ValueError(f"pooled text embeddings of width {pooled.shape[-1]}; the U-Net "
                             f"takes {pooled_width(unet)}")  # fmt: skip
        device, dtype = unet.device, unet.dtype
        return cls(
            pooled=pooled.to(device, dtype),
            uncond_pooled=uncond_pooled.to(device, dtype) if guided else None,
            time_ids=time_ids(width, height, dtype=dtype, device=device),
        )
