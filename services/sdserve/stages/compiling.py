"""Compiling a Denoiser's U-Net at start-up, as `engine.compile` says (the Denoiser stage)."""

from __future__ import annotations

import logging

from sdserve.config import EngineConfig
from sdserve.metrics import StatsLogger
from sdserve.pipeline.compiled import resolve_mode, resolve_shapes
from sdserve.pipeline.denoise import Denoiser
from sdserve.pipeline.threads import ThreadPlan, set_threads
from sdserve.stats import UNetCompiled

logger = logging.getLogger(__name__)


def compile_unet(denoiser: Denoiser, engine: EngineConfig, stats: StatsLogger,
                 plan: ThreadPlan | None, model: str) -> ThreadPlan | None:  # fmt: skip
    """Compiles and warms the Denoiser's U-Net as `engine.compile` says (nothing when off), and
    returns the thread plan to serve with: a compiled U-Net runs every forward on the full
    batch's threads (inductor builds its CPU kernels for the thread count it compiles at).
    Call it on the stage's torch thread, after the thread plan is measured."""
    if plan is not None:
        set_threads(plan.small)
    mode = resolve_mode(engine.compile, denoiser.device, denoiser.forward_seconds(engine.compile))
    if mode == "off":
        logger.info("the U-Net of model %s runs eagerly (engine.compile: %s)", model,
                    engine.compile)  # fmt: skip
        return plan
    if plan is not None:
        plan = ThreadPlan.fixed(plan.large)
    dynamic = resolve_shapes(engine.compile_shapes, denoiser.device) == "dynamic"
    logger.info("compiling the U-Net of model %s (%s, %s) at %d size(s)", model, mode,
                "one dynamic graph" if dynamic else f"buckets {list(engine.compile_buckets)}",
                1 + len(engine.compile_sizes))  # fmt: skip

    def compiled(bucket: int, shape: tuple[int, ...], seconds: float, warmup: bool) -> None:
        stats.record(UNetCompiled(bucket=bucket, latent_shape=shape, seconds=seconds,
                                  warmup=warmup))  # fmt: skip

    seconds = denoiser.compile(
        mode,
        None if dynamic else engine.compile_buckets,
        engine.compile_sizes,
        compiled,
        plan.threads_for if plan is not None else None,
        max_rows=2 * engine.max_batch_size,
    )
    logger.info("compiled the U-Net of model %s in %.1fs", model, seconds)
    return plan
