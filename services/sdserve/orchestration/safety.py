"""The request path's part of the safety checker (a model's `safety: flag | block`): the
SafetyChecker stage after the VaeDecoder, and no previews of a model that blocks images."""

from __future__ import annotations

from collections.abc import Sequence

from sdserve.config import SdserveConfig
from sdserve.orchestration.client import StageClient
from sdserve.stages.messages import CheckedImages, CheckImages


async def check_images(client: StageClient, request_id: str,
                       pngs: Sequence[bytes]) -> CheckedImages:  # fmt: skip
    """The SafetyChecker's verdicts on a request's images (and the images to return); for a
    model without one, the images as they are and no verdicts."""
    if not client.has_safety_checker:
        return CheckedImages(tuple(pngs), (), ())
    return await client.check_images(CheckImages(request_id, tuple(pngs)))


def preview_every(config: SdserveConfig, model: str, every: int) -> int:
    """Previews every `every` steps; none for a model whose safety checker blocks images
    (`safety: block`): a preview shows the image before it is checked."""
    try:
        blocks = config.model_named(model).safety == "block"
    except KeyError:  # a path built on clients the config does not name (tests)
        blocks = False
    return 0 if blocks else every
