"""The text-encoder stage: tokenizer + CLIP text model -> prompt embeddings.

Mirrors `StableDiffusionPipeline.encode_prompt` in diffusers (no clip_skip), so the
embeddings match diffusers' bit for bit on the same weights. An SDXL folder has two text
encoders; there it mirrors `StableDiffusionXLPipeline.encode_prompt`: both encoders'
penultimate hidden states side by side, and the second one's pooled, projected output.
A request's LoRA adapters apply to its own encodes only (`lora.rows`), as diffusers applies
them to the prompt and the negative prompt; the encoders' weights are never changed.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from sdserve.pipeline import lora, models
from sdserve.pipeline.precision import resolve_dtype

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class PromptEmbeddings:
    """What the U-Net is conditioned on for one prompt and its negative prompt.

    Attributes:
        cond: the prompt's embeddings, shape (1, seq_len, hidden); for SDXL hidden is both
            encoders' widths side by side (768 + 1280 for SDXL base).
        uncond: the negative prompt's, same shape; None unless asked for.
        pooled: SDXL only: the second encoder's pooled, projected output (`text_embeds`),
            shape (1, projection_dim).
        uncond_pooled: SDXL only: the negative prompt's, same shape; None unless asked for.
    """

    cond: torch.Tensor
    uncond: torch.Tensor | None
    pooled: torch.Tensor | None = None
    uncond_pooled: torch.Tensor | None = None


class TextEncoder:
    """Loads `tokenizer/` and `text_encoder/` of a model folder (and `tokenizer_2/` and
    `text_encoder_2/` of an SDXL folder)."""

    def __init__(self, model_dir: str | Path, device: str = "auto", dtype: str = "auto", *,
                 allow_pickle: bool = False):  # fmt: skip
        root = models.check_model_dir(model_dir, ("tokenizer", "text_encoder"),
                                      allow_pickle=allow_pickle)  # fmt: skip
        self.device = models.resolve_device(device)
        self.dtype = resolve_dtype(dtype, self.device)
        second = None
        if models.model_family(root) == "sdxl":
            models.check_model_dir(root, ("tokenizer_2", "text_encoder_2"),
                                   allow_pickle=allow_pickle)  # fmt: skip
            second = (
                models.load_tokenizer(root, "tokenizer_2"),
                models.load_text_encoder(
                    root, self.device, self.dtype, "text_encoder_2", allow_pickle=allow_pickle
                ),  # fmt: skip
            )
        self._set_parts(
            models.load_tokenizer(root),
            models.load_text_encoder(root, self.device, self.dtype, allow_pickle=allow_pickle),
            second,
            bool(models.read_index(root).get("force_zeros_for_empty_prompt", True)),
        )

    @classmethod
    def from_parts(
        cls,
        tokenizer,
        model,
        *,
        tokenizer_2=None,
        model_2=None,
        force_zeros_for_empty_prompt: bool = True,
    ) -> TextEncoder:
        """Wraps an already-loaded tokenizer and CLIPTextModel (benchmarks build them in memory);
        for SDXL also the second tokenizer and CLIPTextModelWithProjection."""
        encoder = cls.__new__(cls)
        encoder.device, encoder.dtype = model.device, model.dtype
        second = (tokenizer_2, model_2) if model_2 is not None else None
        encoder._set_parts(tokenizer, model, second, force_zeros_for_empty_prompt)
        return encoder

    def _set_parts(self, tokenizer, model, second, force_zeros: bool) -> None:
        self.tokenizer, self.model = tokenizer, model
        self.tokenizer_2, self.model_2 = second or (None, None)
        self.force_zeros_for_empty_prompt = force_zeros
        """SDXL: an empty negative prompt gives zero embeddings (diffusers' `negative_prompt=None`
        with the folder's `force_zeros_for_empty_prompt`)."""
        self._use_mask = bool(getattr(model.config, "use_attention_mask", False))

    @property
    def family(self) -> str:
        """The model family: "sdxl" with two text encoders, else "sd2" for OpenCLIP (`gelu`),
        "sd1" for CLIP."""
        if self.model_2 is not None:
            return "sdxl"
        return models.config_family({}, self.model.config.to_dict())

    def _ids(self, tokenizer, text: str):
        return tokenizer(
            [text],
            padding="max_length",
            max_length=tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        )

    @torch.inference_mode()
    def _embed(self, text: str) -> torch.Tensor:
        """SD 1.x/2.x: the last hidden state (after the final layer norm), (1, seq_len, hidden)."""
        inputs = self._ids(self.tokenizer, text)
        mask = inputs.attention_mask.to(self.device) if self._use_mask else None
        hidden = self.model(inputs.input_ids.to(self.device), attention_mask=mask)[0]
        return hidden.to(self.dtype)

    @torch.inference_mode()
    def _embed_xl(self, text: str) -> tuple[torch.Tensor, torch.Tensor]:
        """SDXL: (both encoders' penultimate hidden states concatenated, (1, seq_len, 768 + 1280);
        the second encoder's pooled output `text_embeds`, (1, projection_dim))."""
        hidden = []
        for tokenizer, model in ((self.tokenizer, self.model), (self.tokenizer_2, self.model_2)):
            ids = self._ids(tokenizer, text).input_ids.to(self.device)
            out = model(ids, output_hidden_states=True)
            hidden.append(out.hidden_states[-2])  # clip_skip None: the penultimate layer
        pooled = out[0]  # CLIPTextModelWithProjection: text_embeds, (1, projection_dim)
        return torch.cat(hidden, dim=-1).to(self.dtype), pooled

    def calibration_forward(self, rows: int = 1) -> None:
        """Encodes `rows` prompts (for timing: `sdserve.pipeline.threads`)."""
        embed = self._embed if self.model_2 is None else self._embed_xl
        for _ in range(rows):
            embed("a photograph of an astronaut riding a horse")

    def encode(
        self,
        prompt: str,
        negative_prompt: str = "",
        with_uncond: bool = True,
        loras: Sequence[tuple[lora.LoraAdapter, float]] = (),
    ) -> PromptEmbeddings:
        """Encodes a prompt and, when `with_uncond`, the negative prompt ("" when none), with
        the text-encoder factors of `loras` (adapters loaded for this encoder, and scales).

        SDXL: an empty negative prompt gives zeros for `uncond` and `uncond_pooled` when the
        folder's `force_zeros_for_empty_prompt` is set (its default), as diffusers does for
        `negative_prompt=None`; "" here is diffusers' None.

        Returns:
            `PromptEmbeddings`: cond of shape (1, model_max_length, hidden) in the model's
            dtype; uncond the same or None when `with_uncond` is False; for SDXL pooled and
            uncond_pooled of shape (1, projection_dim).
        """
        with contextlib.ExitStack() as stack:
            if any(adapter.text_encoder or adapter.text_encoder_2 for adapter, _ in loras):
                plan = [tuple(loras)]  # one row per encode
                stack.enter_context(lora.rows(self.model, plan, "text_encoder"))
                if self.model_2 is not None:
                    stack.enter_context(lora.rows(self.model_2, plan, "text_encoder_2"))
            return self._encode(prompt, negative_prompt, with_uncond)

    def _encode(self, prompt: str, negative_prompt: str, with_uncond: bool) -> PromptEmbeddings:
        if self.model_2 is None:
            cond = self._embed(prompt)
            return PromptEmbeddings(cond, self._embed(negative_prompt) if with_uncond else None)
        cond, pooled = self._embed_xl(prompt)
        if not with_uncond:
            return PromptEmbeddings(cond, None, pooled)
        if negative_prompt == "" and self.force_zeros_for_empty_prompt:
            return PromptEmbeddings(cond, torch.zeros_like(cond), pooled, torch.zeros_like(pooled))
        uncond, uncond_pooled = self._embed_xl(negative_prompt)
        return PromptEmbeddings(cond, uncond, pooled, uncond_pooled)
