"""A loaded LoRA adapter: its low-rank factors per module, for each model part. Loading one is
`sdserve.pipeline.lora`; applying adapters per batch row is `sdserve.pipeline.lora_layers`."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

PARTS = ("unet", "text_encoder", "text_encoder_2")
"""The model parts a LoRA file may hold factors for (its keys' prefixes)."""


@dataclass(frozen=True, eq=False)
class LoraFactors:
    """One module's low-rank update: delta(x) = up(down(x)) * scale.

    Attributes:
        down: A, shape (rank, in) for a Linear, (rank, in, kh, kw) for a Conv2d.
        up: B, shape (out, rank) for a Linear, (out, rank, 1, 1) for a Conv2d.
        scale: alpha / rank (alpha / sqrt(rank) for rank-stabilized LoRA).
    """

    down: torch.Tensor
    up: torch.Tensor
    scale: float

    @property
    def rank(self) -> int:
        return self.down.shape[0]

    @property
    def nbytes(self) -> int:
        return self.down.nbytes + self.up.nbytes


@dataclass(eq=False)
class LoraAdapter:
    """A loaded LoRA: its factors by module name, for each model part.

    Attributes:
        name: what requests call it.
        unet: factors by U-Net module name (`unet.named_modules()`).
        text_encoder: factors by text-encoder module name (empty: none).
        text_encoder_2: SDXL's second text encoder's (empty: none).
        path: the file it was read from.
    """

    name: str
    unet: dict[str, LoraFactors] = field(default_factory=dict)
    text_encoder: dict[str, LoraFactors] = field(default_factory=dict)
    text_encoder_2: dict[str, LoraFactors] = field(default_factory=dict)
    path: str = ""

    def factors(self, part: str) -> dict[str, LoraFactors]:
        """The factors of one part: "unet", "text_encoder" or "text_encoder_2"."""
        return getattr(self, part)

    @property
    def nbytes(self) -> int:
        """The memory its factors take."""
        return sum(f.nbytes for part in PARTS for f in self.factors(part).values())

    def __repr__(self) -> str:
        counts = ", ".join(f"{p}={len(self.factors(p))}" for p in PARTS if self.factors(p))
        return f"LoraAdapter({self.name!r}, {counts or 'empty'}, {self.nbytes} bytes)"
