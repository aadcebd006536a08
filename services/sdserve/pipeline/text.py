"""The text-encoder stage: tokenizer + CLIP text model -> prompt embeddings.

Mirrors `StableDiffusionPipeline.encode_prompt` in diffusers (no LoRA, no clip_skip), so the
embeddings match diffusers' bit for bit on the same weights.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from sdserve.pipeline import models

logger = logging.getLogger(__name__)


class TextEncoder:
    """Loads `tokenizer/` and `text_encoder/` of a model folder."""

    def __init__(self, model_dir: str | Path, device: str = "auto", dtype: str = "auto"):
        root = models.check_model_dir(model_dir, ("tokenizer", "text_encoder"))
        self.device = models.resolve_device(device)
        self.dtype = models.resolve_dtype(dtype, self.device)
        self._set_parts(
            models.load_tokenizer(root), models.load_text_encoder(root, self.device, self.dtype)
        )

    @classmethod
    def from_parts(cls, tokenizer, model) -> TextEncoder:
        """Wraps an already-loaded tokenizer and CLIPTextModel (benchmarks build them in memory)."""
        encoder = cls.__new__(cls)
        encoder.device, encoder.dtype = model.device, model.dtype
        encoder._set_parts(tokenizer, model)
        return encoder

    def _set_parts(self, tokenizer, model) -> None:
        self.tokenizer, self.model = tokenizer, model
        self._use_mask = bool(getattr(model.config, "use_attention_mask", False))

    @torch.inference_mode()
    def _embed(self, text: str) -> torch.Tensor:
        inputs = self.tokenizer(
            [text],
            padding="max_length",
            max_length=self.tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        )
        mask = inputs.attention_mask.to(self.device) if self._use_mask else None
        hidden = self.model(inputs.input_ids.to(self.device), attention_mask=mask)[0]
        return hidden.to(self.dtype)

    def calibration_forward(self, rows: int = 1) -> None:
        """Encodes `rows` prompts (for timing: `sdserve.pipeline.threads`)."""
        for _ in range(rows):
            self._embed("a photograph of an astronaut riding a horse")

    def encode(
        self, prompt: str, negative_prompt: str = "", with_uncond: bool = True
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Encodes a prompt and, when `with_uncond`, the negative prompt ("" when none).

        Returns:
            cond: `torch.Tensor` of shape (1, model_max_length, hidden_size), the model's dtype.
            uncond: same shape, or None when `with_uncond` is False.
        """
        cond = self._embed(prompt)
        uncond = self._embed(negative_prompt) if with_uncond else None
        return cond, uncond
