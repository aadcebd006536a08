"""What the stage deployments share: one torch thread per replica, and loading a stage."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

from sdserve.config import SdserveConfig
from sdserve.constants import resolve_model_dir
from sdserve.metrics import Metrics

T = TypeVar("T")
# Serve's logger: its lines carry the replica and the request id, and land in Serve's logs.
logger = logging.getLogger("ray.serve")


class TorchThread:
    """The one thread of a replica that runs torch.

    Torch's OpenMP pool belongs to the thread that first runs a parallel op. When a second
    thread computes too, each gets its own pool and both slow down (measured here: a diffusers
    call took 1.8x as long once two threads had computed). So a replica loads its model and
    runs every forward on this single thread, and its async methods await it.
    """

    def __init__(self, name: str):
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=name)

    def call(self, fn: Callable[..., T], *args) -> T:
        """Runs fn(*args) on the torch thread and waits (for __init__)."""
        return self.executor.submit(fn, *args).result()

    async def run(self, fn: Callable[..., T], *args) -> T:
        """Runs fn(*args) on the torch thread without blocking the replica's event loop."""
        return await asyncio.get_running_loop().run_in_executor(self.executor, fn, *args)


def show_pipeline_logs() -> None:
    """Sends the pure pipeline layer's log lines (logger "sdserve") to the replica's stderr,
    which Ray keeps in the worker's log file and forwards to the driver's console."""
    root = logging.getLogger("sdserve")
    if not root.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        root.addHandler(handler)
        root.setLevel(logging.INFO)


def load_stage(stage_cls: type[T], config: dict, stage: str, metrics: Metrics) -> T:
    """Builds a pipeline stage (TextEncoder, Denoiser, VaeDecoder) from the config tree;
    `stage` names its entry in `config.stages`. Call it on the replica's TorchThread.

    Records the load time, and on CUDA starts reporting the replica's GPU memory."""
    show_pipeline_logs()
    started = time.perf_counter()
    tree = SdserveConfig.model_validate(config)
    model = tree.model
    threads = getattr(tree.stages, stage).torch_threads
    if threads:
        import torch

        torch.set_num_threads(threads)
    path = resolve_model_dir(model.path)
    loaded = stage_cls(path, model.device, model.dtype)
    seconds = time.perf_counter() - started
    metrics.model_load_seconds.set(seconds, tags={"stage": stage})
    device = getattr(loaded, "device", None)
    logger.info("%s loaded %s on %s in %.1fs", stage_cls.__name__, path, device, seconds)
    if device is not None and getattr(device, "type", "") == "cuda" and metrics.enabled:
        _report_gpu_memory(metrics, stage, device)
    return loaded


def _report_gpu_memory(metrics: Metrics, stage: str, device, every_s: float = 5.0) -> None:
    """A daemon thread that sets sdserve_gpu_memory_bytes every `every_s` seconds."""
    import torch

    def loop() -> None:
        while True:
            for kind, value in (("allocated", torch.cuda.memory_allocated(device)),
                                ("reserved", torch.cuda.memory_reserved(device))):  # fmt: skip
                metrics.gpu_memory_bytes.set(value, tags={"stage": stage, "kind": kind})
            time.sleep(every_s)

    threading.Thread(target=loop, name=f"{stage}-gpu-memory", daemon=True).start()


def drain_key(app_name: str) -> str:
    """The Ray cluster KV key `sdserve serve` sets before it shuts down (server.drain)."""
    return f"sdserve/{app_name}/draining"


def set_draining(app_name: str, draining: bool) -> None:
    """Sets or clears the drain flag every Pipeline and JobWorker replica of the app watches."""
    from ray.experimental import internal_kv

    if draining:
        internal_kv._internal_kv_put(drain_key(app_name), b"1", overwrite=True)
    else:
        internal_kv._internal_kv_del(drain_key(app_name))


async def watch_drain(app_name: str, on_drain: Callable[[], None], every_s: float = 0.5) -> None:
    """Calls `on_drain()` once the app's drain flag is set (a replica's background task).

    Ray's cluster KV reaches every replica on every node, which a Serve handle call (one
    replica) or a redeploy (it would restart the replicas) does not."""
    from ray.experimental import internal_kv

    key = drain_key(app_name)
    while not await asyncio.to_thread(internal_kv._internal_kv_get, key):
        await asyncio.sleep(every_s)
    on_drain()
