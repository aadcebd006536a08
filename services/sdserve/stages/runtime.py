"""What the stage services share: one torch thread per process part, and loading a stage."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TypeVar

from sdserve.config import ModelConfig, SdserveConfig
from sdserve.constants import DIT_FAMILIES, TEXT_ONLY_FAMILIES, resolve_model_dir
from sdserve.metrics import StatsLogger
from sdserve.pipeline.models import model_family
from sdserve.pipeline.precision import dtype_name
from sdserve.pipeline.threads import ThreadPlan, measure_plan, set_threads
from sdserve.stages.batching import CallBatcher
from sdserve.stages.messages import StageInfo
from sdserve.stats import GpuMemory, ModelLoaded

T = TypeVar("T")
logger = logging.getLogger(__name__)


class TorchThread:
    """The one thread that runs torch for a stage.

    Torch's OpenMP pool belongs to the thread that first runs a parallel op. When a second
    thread computes too, each gets its own pool and both slow down (measured here: a diffusers
    call took 1.8x as long once two threads had computed). So a stage loads its model and runs
    every forward on this single thread, and its async methods await it. The Denoiser's engine
    runs its U-Net steps as tasks on it too, so other work queued here runs between two steps.
    """

    def __init__(self, name: str, executor: ThreadPoolExecutor | None = None):
        """A new thread named `name`, or `executor` (a one-worker pool: benchmarks share theirs
        with the stages they build)."""
        self.executor = executor or ThreadPoolExecutor(max_workers=1, thread_name_prefix=name)

    def submit(self, fn: Callable[..., T], *args) -> Future[T]:
        """Queues fn(*args) on the torch thread."""
        return self.executor.submit(fn, *args)

    def call(self, fn: Callable[..., T], *args) -> T:
        """Runs fn(*args) on the torch thread and waits (for constructors)."""
        return self.submit(fn, *args).result()

    async def run(self, fn: Callable[..., T], *args) -> T:
        """Runs fn(*args) on the torch thread without blocking the caller's event loop."""
        return await asyncio.wrap_future(self.submit(fn, *args))

    def close(self) -> None:
        self.executor.shutdown(wait=False, cancel_futures=True)


class OneCallStage:
    """A stage whose every call is one piece of torch work on its torch thread, at the thread
    count the plan gives small work (the TextEncoder, VaeEncoder and VaeDecoder services).

    Subclasses name the pipeline part they load (`part_cls`) and their entry in
    `config.stages` (`stage`)."""

    part_cls: type
    stage: str

    def __init__(self, part, torch_thread: TorchThread, threads: ThreadPlan | None = None):
        self.part = part
        self.torch = torch_thread
        self.threads = threads
        """Torch threads for this stage's work (None: leave them as they are)."""

    @classmethod
    def from_config(cls, config: SdserveConfig, stats: StatsLogger,
                    torch_thread: TorchThread | None = None,
                    model: ModelConfig | None = None):  # fmt: skip
        """Loads the part of `model` (default: the config's default model) on the torch
        thread (a new one unless given) and measures its thread plan there."""
        model = model or config.model_named()
        thread = torch_thread or TorchThread(cls.stage.replace("_", "-"))
        part = thread.call(load_stage, cls.part_cls, model, cls.stage, stats,
                           cls.part_kwargs(config, model))  # fmt: skip
        stage = cls(part, thread, thread.call(thread_plan, config, cls.stage, part, model))
        stage.configure(config, model)
        return stage

    @classmethod
    def part_kwargs(cls, config: SdserveConfig, model: ModelConfig) -> dict:
        """Keyword arguments of `part_cls` from the config (none, unless overridden)."""
        return {}

    def configure(self, config: SdserveConfig, model: ModelConfig) -> None:
        """Takes what else the stage needs from the config (nothing, unless overridden)."""

    def info(self) -> StageInfo:
        """How this stage computes (its device, dtype and threads)."""
        return stage_info(self.stage, self.part, self.threads)

    max_batch: int = 16
    """The most calls one batched call takes (`batcher`; `engine.max_batch_size` once
    configured)."""

    def _with_threads(self, fn: Callable[..., T]) -> Callable[..., T]:
        """fn, run at the plan's threads for small work."""

        def call(*args) -> T:
            if self.threads is not None:
                set_threads(self.threads.small)
            return fn(*args)

        return call

    async def _run(self, fn: Callable[..., T], *args) -> T:
        """fn(*args) on the torch thread, with the plan's threads for small work."""
        return await self.torch.run(self._with_threads(fn), *args)

    def batcher(self, run: Callable, key: Callable = lambda req: None) -> CallBatcher:
        """Batches this stage's calls across requests on its torch thread (`CallBatcher`):
        `run(requests)` returns one result per request."""
        return CallBatcher(self.torch.submit, self._with_threads(run), key, self.max_batch)


def stage_info(stage: str, part, threads: ThreadPlan | None,
               compile_mode: str = "off") -> StageInfo:  # fmt: skip
    """A stage's `StageInfo` from its loaded part (which has `device` and `dtype`)."""
    return StageInfo(
        stage=stage,
        device=part.device.type,
        dtype=dtype_name(part.dtype),
        compile=compile_mode,
        threads_small=threads.small if threads is not None else 0,
        threads_large=threads.large if threads is not None else 0,
    )


def load_stage(stage_cls: Callable[..., T], model: ModelConfig, stage: str, stats: StatsLogger,
               kwargs: dict | None = None) -> T:  # fmt: skip
    """Builds a pipeline stage (TextEncoder, Denoiser, VaeDecoder, VaeEncoder) of one served
    model; `stage` names its entry in `config.stages`. Call it on the stage's TorchThread.

    Records the load time, and on CUDA starts reporting the stage's GPU memory."""
    started = time.perf_counter()
    path = resolve_model_dir(model.path)
    loaded = stage_cls(path, model.device, model.dtype, allow_pickle=model.allow_pickle,
                       **(kwargs or {}))  # fmt: skip
    seconds = time.perf_counter() - started
    stats.record(ModelLoaded(stage=stage, seconds=seconds))
    device = getattr(loaded, "device", None)
    logger.info("%s of model %s loaded %s on %s in %s (dtype %s) in %.1fs", stage_cls.__name__,
                model.name, path, device, dtype_name(loaded.dtype), model.dtype,
                seconds)  # fmt: skip
    if device is not None and getattr(device, "type", "") == "cuda" and stats.metrics.enabled:
        _report_gpu_memory(stats, stage, device)
    return loaded


def thread_plan(
    config: SdserveConfig,
    stage: str,
    loaded,
    model: ModelConfig | None = None,
    small_rows: int = 1,
    large_rows: int = 1,
) -> ThreadPlan | None:
    """The stage's torch threads from `stages.<stage>.torch_threads` (or the model's own stage
    settings): measured (auto, on a CPU), fixed (a number), or None (leave what Ray set). Call
    it on the stage's TorchThread after `load_stage`; `loaded.calibration_forward(rows)` is what
    gets timed."""
    setting = config.stage(stage, model).torch_threads
    if isinstance(setting, int):
        set_threads(setting)
        return ThreadPlan.fixed(setting)
    if setting is None or getattr(loaded, "device", None) is None or loaded.device.type != "cpu":
        return None
    return measure_plan(loaded.calibration_forward, small_rows, large_rows)


def _report_gpu_memory(stats: StatsLogger, stage: str, device, every_s: float = 5.0) -> None:
    """A daemon thread that records the stage's CUDA memory every `every_s` seconds."""
    import torch

    def loop() -> None:
        while True:
            allocated = torch.cuda.memory_allocated(device)
            stats.record(GpuMemory(stage, allocated, torch.cuda.memory_reserved(device)))
            time.sleep(every_s)

    threading.Thread(target=loop, name=f"{stage}-gpu-memory", daemon=True).start()


def model_stages(config: SdserveConfig, model: ModelConfig) -> tuple[str, ...]:
    """The stages `model` has deployments of (`STAGE_DEPLOYMENTS` keys): the VaeEncoder unless
    its family takes no image inputs (SDXL, SD3, FLUX: `TEXT_ONLY_FAMILIES`), and for SD3 and
    FLUX the TextEncoderT5 when `stages.text_encoder_t5` (the model's or the shared one) is
    set, and the SafetyChecker when the model's `safety` is not off. Reads the family from the
    folder's json files; a folder this machine cannot read is taken for an SD 1.x model."""
    root = resolve_model_dir(model.path)
    if not root.is_dir():
        logger.warning("model %s: cannot read %s here; deploying it as an SD 1.x model",
                       model.name, root)  # fmt: skip
    family = model_family(root)
    safety = ("safety_checker",) if model.safety != "off" else ()
    if family not in TEXT_ONLY_FAMILIES:
        return "text_encoder", "denoiser", "vae_decoder", "vae_encoder", *safety
    own_t5 = family in DIT_FAMILIES and config.stage("text_encoder_t5", model) is not None
    t5 = ("text_encoder_t5",) if own_t5 else ()
    return "text_encoder", "denoiser", "vae_decoder", *t5, *safety
