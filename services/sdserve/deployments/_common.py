"""What the stage deployments share."""

from __future__ import annotations

import logging
from typing import TypeVar

from sdserve.config import SdserveConfig
from sdserve.pipeline.models import resolve_model_dir

T = TypeVar("T")
# Serve's logger: its lines carry the replica and the request id, and land in Serve's logs.
logger = logging.getLogger("ray.serve")


def load_stage(stage_cls: type[T], config: dict) -> T:
    """Builds a pipeline stage (TextEncoder, Denoiser, VaeDecoder) from the config tree."""
    model = SdserveConfig.model_validate(config).model
    if model.torch_threads:
        import torch

        torch.set_num_threads(model.torch_threads)
    path = resolve_model_dir(model.path, model.cache_dir)
    stage = stage_cls(path, model.device, model.dtype)
    logger.info("%s loaded %s on %s", stage_cls.__name__, path, getattr(stage, "device", "?"))
    return stage
