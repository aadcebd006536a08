"""Text encoding of the diffusion transformers (SD3, FLUX), as two parts that can run apart.

- `ClipEncoders`: the CLIP side. SD3 mirrors `StableDiffusion3Pipeline._get_clip_prompt_embeds`
  for CLIP-L and CLIP-G: each one's penultimate hidden states (side by side, (1, 77, hl + hg))
  and pooled, projected output (side by side, (1, pl + pg)). FLUX mirrors
  `FluxPipeline._get_clip_prompt_embeds`: CLIP-L's pooled output only, (1, hidden).
- `T5Encoder`: the T5 side (`_get_t5_prompt_embeds` of either pipeline): the last hidden state
  of the prompt padded or cut to `max_sequence_length` tokens, (1, max_sequence_length, d_model).

T5-XXL is 4.7 B parameters, larger than SD 1.5 whole, so a deployment can run it as a stage of
its own (`stages.text_encoder_t5`); the Denoiser puts the parts together
(`dit.prompt_tokens`). A negative prompt "" is encoded as "", as both pipelines do.
"""

from __future__ import annotations

from pathlib import Path

import torch

from sdserve.constants import DEFAULT_MAX_SEQUENCE_LENGTH, MAX_SEQUENCE_LENGTH
from sdserve.errors import InvalidArgument
from sdserve.pipeline import models
from sdserve.pipeline.precision import resolve_dtype
from sdserve.pipeline.text import PromptEmbeddings

T5_PART = {"sd3": "text_encoder_3", "flux": "text_encoder_2"}
"""Where each family keeps its T5 encoder (its tokenizer: the same name with "tokenizer")."""


def sequence_length(family: str, requested: int = 0) -> int:
    """The T5 length a request runs with: `requested`, or the family's default when 0.

    Raises:
        InvalidArgument: naming `max_sequence_length` when it is over the maximum.
    """
    length = requested or DEFAULT_MAX_SEQUENCE_LENGTH[family]
    if not 1 <= length <= MAX_SEQUENCE_LENGTH:
        raise InvalidArgument("max_sequence_length", f"must be within 1..{MAX_SEQUENCE_LENGTH} "
                              f"for {family} models, got {length}")  # fmt: skip
    return length


class T5Encoder:
    """Loads a diffusion transformer's T5 tokenizer and encoder (`T5_PART`)."""

    def __init__(self, model_dir: str | Path, device: str = "auto", dtype: str = "auto", *,
                 allow_pickle: bool = False):  # fmt: skip
        root = Path(model_dir)
        self.family = models.model_family(root)
        if self.family not in T5_PART:
            raise ValueError(f"{root} is a {self.family} model, which has no T5 encoder")
        part = T5_PART[self.family]
        models.check_model_dir(root, (part,), allow_pickle=allow_pickle)
        self.device = models.resolve_device(device)
        self.dtype = resolve_dtype(dtype, self.device)
        self.tokenizer, self.model = models.load_t5(root, part, self.device, self.dtype,
                                                    allow_pickle=allow_pickle)  # fmt: skip

    @torch.inference_mode()
    def _embed(self, text: str, length: int) -> torch.Tensor:
        ids = self.tokenizer([text], padding="max_length", max_length=length, truncation=True,
                             add_special_tokens=True, return_tensors="pt").input_ids  # fmt: skip
        return self.model(ids.to(self.device))[0].to(self.model.dtype)

    def encode(self, prompt: str, negative_prompt: str = "", with_uncond: bool = True,
               max_sequence_length: int = 0) -> PromptEmbeddings:  # fmt: skip
        """The prompt's T5 embeddings (and the negative prompt's when `with_uncond`), shape
        (1, max_sequence_length, d_model); 0: the family's default length."""
        length = sequence_length(self.family, max_sequence_length)
        uncond = self._embed(negative_prompt, length) if with_uncond else None
        return PromptEmbeddings(self._embed(prompt, length), uncond)

    def calibration_forward(self, rows: int = 1) -> None:
        """Encodes `rows` prompts (for timing: `sdserve.pipeline.threads`)."""
        for _ in range(rows):
            self._embed("a photograph of an astronaut riding a horse", 64)


class ClipEncoders:
    """Loads the CLIP encoders of an SD3 (`text_encoder/`, `text_encoder_2/`, both with
    projection) or FLUX (`text_encoder/`) folder, and with `with_t5` its T5 encoder too."""

    def __init__(self, model_dir: str | Path, device: str = "auto", dtype: str = "auto", *,
                 allow_pickle: bool = False, with_t5: bool = True):  # fmt: skip
        root = Path(model_dir)
        self.family = models.model_family(root)
        parts = ("tokenizer", "text_encoder")
        if self.family == "sd3":
            parts += ("tokenizer_2", "text_encoder_2")
        root = models.check_model_dir(root, parts, allow_pickle=allow_pickle)
        self.device = models.resolve_device(device)
        self.dtype = resolve_dtype(dtype, self.device)
        projection = self.family == "sd3"
        self.clips = [
            (models.load_tokenizer(root, tok),
             models.load_text_encoder(root, self.device, self.dtype, enc, projection=projection,
                                      allow_pickle=allow_pickle))
            for tok, enc in zip(parts[::2], parts[1::2], strict=True)
        ]  # fmt: skip
        self.t5 = T5Encoder(root, device, dtype, allow_pickle=allow_pickle) if with_t5 else None
        """The T5 encoder when it runs in this stage (None: a stage of its own runs it)."""

    @torch.inference_mode()
    def _embed(self, text: str) -> tuple[torch.Tensor | None, torch.Tensor]:
        """(SD3: both CLIPs' penultimate hidden states side by side, (1, 77, hl + hg); FLUX:
        None), (the pooled embeddings side by side, (1, pl + pg) or (1, hidden))."""
        hidden, pooled = [], []
        for tokenizer, model in self.clips:
            ids = tokenizer([text], padding="max_length", max_length=tokenizer.model_max_length,
                            truncation=True, return_tensors="pt").input_ids  # fmt: skip
            out = model(ids.to(self.device), output_hidden_states=self.family == "sd3")
            if self.family == "sd3":
                hidden.append(out.hidden_states[-2].to(self.clips[0][1].dtype))
                pooled.append(out[0])  # text_embeds: the projected pooled output
            else:
                pooled.append(out.pooler_output.to(model.dtype))
        return (torch.cat(hidden, dim=-1) if hidden else None), torch.cat(pooled, dim=-1)

    def encode(self, prompt: str, negative_prompt: str = "", with_uncond: bool = True,
               loras=()) -> PromptEmbeddings:  # fmt: skip
        """The CLIP side of a prompt (and of the negative prompt when `with_uncond`): `cond`
        and `uncond` (SD3's CLIP tokens; None for FLUX), `pooled` and `uncond_pooled`. LoRA
        adapters are not supported on these families (the request path refuses them)."""
        cond, pooled = self._embed(prompt)
        if not with_uncond:
            return PromptEmbeddings(cond, None, pooled)
        uncond, uncond_pooled = self._embed(negative_prompt)
        return PromptEmbeddings(cond, uncond, pooled, uncond_pooled)

    def encode_t5(self, prompt: str, negative_prompt: str = "", with_uncond: bool = True,
                  max_sequence_length: int = 0) -> PromptEmbeddings:  # fmt: skip
        """The T5 side (`T5Encoder.encode`), when this stage runs T5."""
        if self.t5 is None:
            raise RuntimeError("this text encoder runs no T5 (stages.text_encoder_t5 does)")
        return self.t5.encode(prompt, negative_prompt, with_uncond, max_sequence_length)

    def calibration_forward(self, rows: int = 1) -> None:
        """Encodes `rows` prompts (for timing: `sdserve.pipeline.threads`)."""
        for _ in range(rows):
            self._embed("a photograph of an astronaut riding a horse")
