"""What the request path hands the Denoiser: a request's `Denoise` message, and whom it is for
(`Who`: its class, priority and tenant, which the Denoiser schedules by)."""

from __future__ import annotations

from dataclasses import dataclass

from sdserve.api.types import GenerateParams
from sdserve.stages.messages import ControlInput, Denoise, ImageEncoding, TextEmbeddings


@dataclass(frozen=True)
class Who:
    """Whom a request is for, which the Denoiser schedules by (`sdserve.pipeline.scheduling`)."""

    request_class: str = "interactive"
    """interactive (a person waits: Generate, GenerateStream, HTTP) or bulk (a job)."""
    priority: str = ""
    """A job's priority (high, normal, low)."""
    tenant: str = ""
    """The API key's tenant ("" without keys)."""


INTERACTIVE = Who()


def denoise_request(
    params: GenerateParams,
    request_id: str,
    embeddings: TextEmbeddings,
    init: ImageEncoding | None,
    controls: tuple[ControlInput, ...],
    t5: TextEmbeddings | None,
    *,
    preview_every: int,
    progress_interval_s: float,
    timeout_s: float,
    who: Who,
) -> Denoise:
    """The Denoiser's request for `params`, given the text (and image) encodings."""
    return Denoise(
        request_id=request_id,
        embeddings=embeddings,
        width=params.width,
        height=params.height,
        steps=params.steps,
        guidance_scale=params.guidance_scale,
        scheduler=params.scheduler,
        seeds=tuple(params.seeds),
        init=init,
        strength=params.strength if init is not None else 1.0,
        guidance_stop=params.guidance_stop,
        cache_interval=params.cache_interval,
        loras=params.loras,
        controls=controls,
        t5=t5,
        true_cfg_scale=params.true_cfg_scale,
        shift=params.shift,
        preview_every=preview_every,
        timeout_s=timeout_s,
        progress_interval_s=progress_interval_s,
        request_class=who.request_class,
        priority=who.priority,
        tenant=who.tenant,
    )
