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

from collections.abc import Sequence
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

    @classmethod
    def from_parts(cls, tokenizer, model, family: str) -> T5Encoder:
        """Wraps a loaded T5 tokenizer and encoder (benchmarks build full-size ones in memory)."""
        encoder = cls.__new__(cls)
        encoder.family, encoder.tokenizer, encoder.model = family, tokenizer, model
        encoder.device, encoder.dtype = model.device, model.dtype
        return encoder

    @torch.inference_mode()
    def _embed(self, texts: Sequence[str], length: int) -> torch.Tensor:
        """(len(texts), length, d_model): one forward over every text, each padded or cut to
        `length` tokens (no attention mask, as the pipelines: each row is its own)."""
        ids = self.tokenizer(list(texts), padding="max_length", max_length=length,
                             truncation=True, add_special_tokens=True,
                             return_tensors="pt").input_ids  # fmt: skip
        return self.model(ids.to(self.device))[0].to(self.model.dtype)

    def encode(self, prompt: str, negative_prompt: str = "", with_uncond: bool = True,
               max_sequence_length: int = 0) -> PromptEmbeddings:  # fmt: skip
        """The prompt's T5 embeddings (and the negative prompt's when `with_uncond`), shape
        (1, max_sequence_length, d_model); 0: the family's default length."""
        return self.encode_many([(prompt, negative_prompt, with_uncond)], max_sequence_length)[0]

    def encode_many(self, requests: Sequence[tuple[str, str, bool]],
                    max_sequence_length: int = 0) -> list[PromptEmbeddings]:  # fmt: skip
        """`encode` of several requests, (prompt, negative prompt, with_uncond) each, in one
        forward: the T5 stage batches the requests waiting for it."""
        length = sequence_length(self.family, max_sequence_length)
        return _split(self._embed(_texts(requests), length), requests)

    def calibration_forward(self, rows: int = 1) -> None:
        """Encodes `rows` prompts (for timing: `sdserve.pipeline.threads`)."""
        self._embed(["a photograph of an astronaut riding a horse"] * rows, 64)


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

    @classmethod
    def from_parts(cls, clips: Sequence[tuple], family: str,
                   t5: T5Encoder | None = None) -> ClipEncoders:  # fmt: skip
        """Wraps loaded (tokenizer, CLIP encoder) pairs, SD3's two or FLUX's one, and a T5."""
        encoders = cls.__new__(cls)
        encoders.family, encoders.clips, encoders.t5 = family, list(clips), t5
        encoders.device, encoders.dtype = clips[0][1].device, clips[0][1].dtype
        return encoders

    @torch.inference_mode()
    def _embed(self, texts: Sequence[str]) -> tuple[torch.Tensor | None, torch.Tensor]:
        """(SD3: both CLIPs' penultimate hidden states side by side, (n, 77, hl + hg); FLUX:
        None), (the pooled embeddings side by side, (n, pl + pg) or (n, hidden)), one forward
        per encoder over every text."""
        hidden, pooled = [], []
        for tokenizer, model in self.clips:
            ids = tokenizer(list(texts), padding="max_length", truncation=True,
                            max_length=tokenizer.model_max_length,
                            return_tensors="pt").input_ids  # fmt: skip
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
        return self.encode_many([(prompt, negative_prompt, with_uncond)])[0]

    def encode_many(self, requests: Sequence[tuple[str, str, bool]]) -> list[PromptEmbeddings]:
        """`encode` of several requests, (prompt, negative prompt, with_uncond) each, in one
        forward per encoder: the TextEncoder batches the requests waiting for it."""
        hidden, pooled = self._embed(_texts(requests))
        tokens = _split(hidden, requests) if hidden is not None else None
        out = []
        for i, e in enumerate(_split(pooled, requests)):
            t = tokens[i] if tokens is not None else PromptEmbeddings(None, None)
            out.append(PromptEmbeddings(t.cond, t.uncond, e.cond, e.uncond))
        return out

    def encode_t5_many(self, requests: Sequence[tuple[str, str, bool]],
                       max_sequence_length: int = 0) -> list[PromptEmbeddings]:  # fmt: skip
        """The T5 side of several requests (`T5Encoder.encode_many`), when this stage runs T5."""
        if self.t5 is None:
            raise RuntimeError("this text encoder runs no T5 (stages.text_encoder_t5 does)")
        return self.t5.encode_many(requests, max_sequence_length)

    def encode_t5(self, prompt: str, negative_prompt: str = "", with_uncond: bool = True,
                  max_sequence_length: int = 0) -> PromptEmbeddings:  # fmt: skip
        """The T5 side (`T5Encoder.encode`), when this stage runs T5."""
        return self.encode_t5_many([(prompt, negative_prompt, with_uncond)],
                                   max_sequence_length)[0]  # fmt: skip

    def calibration_forward(self, rows: int = 1) -> None:
        """Encodes `rows` prompts (for timing: `sdserve.pipeline.threads`)."""
        self._embed(["a photograph of an astronaut riding a horse"] * rows)


def _texts(requests: Sequence[tuple[str, str, bool]]) -> list[str]:
    """The texts a batch of requests encodes: each prompt, then its negative prompt if asked."""
    return [t for prompt, negative, uncond in requests
            for t in ((prompt, negative) if uncond else (prompt,))]  # fmt: skip


def _split(rows: torch.Tensor, requests: Sequence[tuple[str, str, bool]]) -> list[PromptEmbeddings]:
    """`rows` (one per text of `_texts(requests)`) back into each request's (cond, uncond),
    each (1, ...): a fresh tensor, not a view of the batch."""
    out, i = [], 0
    for _, _, uncond in requests:
        cond = rows[i : i + 1].clone()
        out.append(PromptEmbeddings(cond, rows[i + 1 : i + 2].clone() if uncond else None))
        i += 2 if uncond else 1
    return out
