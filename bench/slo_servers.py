"""bench_slo's servers: sdserve with API keys and a job queue, the one-deployment baseline,
the senders that reach them, and what the Denoiser says of its engine.

One Ray instance holds both applications. sdserve answers on its own gRPC front door (its
default); the baseline (`SamplerBatch`, bench_serving's `DiffusersBatch` taking each request's
sampler) answers behind Serve's gRPC proxy on `server.serve_proxy_port`, as a user's Serve
application would: the own front door serves sdserve alone, whatever the `application`
metadata says.
"""

from __future__ import annotations

import contextlib
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from ray import serve

from sdserve.config import SdserveConfig
from sdserve.pipeline.schedulers import make_scheduler
from sdserve.v1 import diffusion_pb2, diffusion_pb2_grpc

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_serving  # noqa: E402
from bench_serving import DiffusersBatch, free_port, start_redis, stop_ray  # noqa: E402

TENANTS = ("bench", "tenant-a", "tenant-b")
"""Tenants of the key file: `bench` sends every load but the tenants scenario's."""
BASELINE_APP = "rayserve"
BASELINE_METADATA = (("application", BASELINE_APP),)
"""What routes a call on Serve's proxy to the baseline."""
BASELINE = dict(dtype="float32", threads=1)
"""The baseline as a user would tune it on this machine: bench_serving's best one-deployment
system here was float32 on the one torch thread Ray gives a replica (rayserve-1t:
docs/performance.md), ahead of every core and of bfloat16."""


class SamplerBatch(DiffusersBatch.func_or_class):
    """bench_serving's baseline deployment taking each request's sampler: diffusers takes one
    scheduler per pipeline call, so each group of a batch (same steps, guidance and size) runs
    as one call per sampler, each sampler built the way a user builds it (`from_config` of the
    folder's scheduler config)."""

    def __init__(self, model: str, samplers: tuple[str, ...], **kwargs):
        super().__init__(model, **kwargs)
        config = self.pipe.scheduler.config
        self.samplers = {name: make_scheduler(name, config) for name in samplers}

    def call(self, group: list, steps: int, guidance: float, width: int, height: int) -> list:
        images: list = [None] * len(group)
        by_sampler: dict[str, list[int]] = {}
        for i, request in enumerate(group):
            by_sampler.setdefault(request.scheduler or "ddim", []).append(i)
        for name, members in by_sampler.items():
            self.pipe.scheduler = self.samplers[name]
            made = super().call([group[i] for i in members], steps, guidance, width, height)
            for i, image in zip(members, made, strict=True):
                images[i] = image
        return images


def key_file(folder: Path) -> tuple[Path, dict[str, str]]:
    """A key file with one key per tenant; returns it and tenant -> key."""
    keys = {tenant: f"sk-slo-{tenant}-{i:04d}" for i, tenant in enumerate(TENANTS)}
    path = folder / "keys.txt"
    path.write_text("".join(f"{key} {tenant}\n" for tenant, key in keys.items()))
    return path, keys


@dataclass
class Servers:
    """The running servers: sdserve's front door, Serve's proxy (the baseline), Redis."""

    config: SdserveConfig
    target: str
    proxy: str
    keys: dict[str, str]
    redis: object
    started_s: dict[str, float] = field(default_factory=dict)

    def metadata(self, tenant: str = "bench") -> tuple[tuple[str, str], ...]:
        return (("authorization", f"Bearer {self.keys[tenant]}"),)

    def redeploy(self, scheduling: str) -> float:
        """Replaces sdserve's application with one whose engine schedules by `scheduling`
        (same ports, keys and queue); returns the seconds it took to serve."""
        from sdserve.serve import server as sdserve_server

        tree = self.config.model_dump()
        tree["engine"]["scheduling"] = scheduling
        self.config = SdserveConfig.model_validate(tree)
        t = time.perf_counter()
        serve.delete(self.config.server.app_name)  # its front door frees the port first
        sdserve_server.deploy(self.config)
        sdserve_server.wait_healthy(self.target, timeout_s=900)
        return time.perf_counter() - t

    def stop(self) -> None:
        stop_ray()
        self.redis.stop()


def sdserve_config(model: Path, keys_path: Path, redis_url: str, *, job_slots: int, engine: dict,
                   denoiser_threads: int | str) -> SdserveConfig:  # fmt: skip
    """sdserve's configuration: its defaults, with the API keys of `keys_path`, the job queue at
    `redis_url` with `job_slots` jobs at a time, `engine`'s settings and the Denoiser's torch
    threads, on free ports (Serve's gRPC proxy on one of them, for the baseline)."""
    denoiser = SdserveConfig().stages.denoiser.model_dump() | {"torch_threads": denoiser_threads}
    return SdserveConfig.model_validate({
        "model": {"path": str(model)},
        "server": {"grpc_port": free_port(), "http_port": free_port(),
                   "serve_proxy_port": free_port(), "api_key_file": str(keys_path)},
        "jobs": {"redis_url": redis_url, "concurrency": job_slots,
                 "max_connections": max(64, 2 * job_slots + 2)},
        "metrics": {"export_port": free_port()},
        "engine": engine,
        "stages": {"denoiser": denoiser},
    })  # fmt: skip


def start(folder: Path, model: Path, samplers: tuple[str, ...], **settings) -> Servers:
    """Redis, Ray, sdserve (`sdserve_config`'s `settings`) and the baseline beside it."""
    from ray import cloudpickle

    from sdserve.serve import server as sdserve_server

    for module in (bench_serving, sys.modules[__name__]):  # replicas cannot import bench/
        cloudpickle.register_pickle_by_value(module)
    redis = start_redis(folder / "redis")
    keys_path, keys = key_file(folder)
    config = sdserve_config(model, keys_path, redis.url, **settings)
    started: dict[str, float] = {}
    t = time.perf_counter()
    try:
        sdserve_server.start_ray(config)
        sdserve_server.deploy(config)
        target = f"127.0.0.1:{config.server.grpc_port}"
        sdserve_server.wait_healthy(target, timeout_s=900)
        started["sdserve_s"] = time.perf_counter() - t
        t = time.perf_counter()
        baseline = serve.deployment(name="SamplerBatch")(SamplerBatch)
        baseline = baseline.options(ray_actor_options={"num_cpus": 0})  # no CPU reserved:
        serve.run(
            baseline.bind(str(model), samplers, **BASELINE),
            name=BASELINE_APP,  # both fit
            route_prefix=f"/{BASELINE_APP}",
        )
        started["baseline_s"] = time.perf_counter() - t
    except BaseException:
        stop_ray()
        redis.stop()
        raise
    proxy = f"127.0.0.1:{config.server.serve_proxy_port}"
    return Servers(config, target, proxy, keys, redis, started)


@contextlib.asynccontextmanager
async def sender(target: str, metadata: tuple = (), timeout_s: float = 600.0):
    """An async `send` (sdserve.loadtest.Sender) of Generate calls to `target`."""
    channel = grpc.aio.insecure_channel(target)
    stub = diffusion_pb2_grpc.DiffusionServiceStub(channel)

    async def send(request: diffusion_pb2.GenerateRequest) -> int:
        reply = await stub.Generate(request, timeout=timeout_s, metadata=metadata)
        return len(reply.images)

    try:
        yield send
    finally:
        await channel.close()


def denoiser_counters() -> dict[str, float]:
    """The Denoiser's stats: every number in DenoiserStats by name (`a.b` inside a message,
    `a.KEY` in a map), whatever fields this version has (the class and pause counters among
    them)."""
    return _numbers(bench_serving.denoiser_stats("sdserve"))


def _numbers(message, prefix: str = "") -> dict[str, float]:
    out: dict[str, float] = {}
    for f, value in message.ListFields():  # (set fields only: an absent one reads as 0)
        name = prefix + f.name
        if f.message_type is not None and f.message_type.GetOptions().map_entry:
            for key, item in value.items():
                if isinstance(item, int | float):
                    out[f"{name}.{key}"] = float(item)
                else:
                    out.update(_numbers(item, f"{name}.{key}."))
        elif f.message_type is not None and not hasattr(value, "__len__"):
            out.update(_numbers(value, f"{name}."))
        elif isinstance(value, int | float) and not isinstance(value, bool):
            out[name] = float(value)
    return out


def counters_since(before: dict[str, float]) -> dict[str, float]:
    """How each counter grew since `before` (gauges such as `running` come out as changes)."""
    after = denoiser_counters()
    return {name: after.get(name, 0.0) - before.get(name, 0.0) for name in {*after, *before}}


def wait_idle(timeout_s: float = 300.0) -> float:
    """Waits until the Denoiser runs and holds nothing; returns the seconds waited."""
    t = time.perf_counter()
    while time.perf_counter() - t < timeout_s:
        stats = bench_serving.denoiser_stats("sdserve")
        if stats.running == 0 and stats.waiting == 0:
            return time.perf_counter() - t
        time.sleep(0.5)
    raise TimeoutError(f"the Denoiser still had work after {timeout_s:.0f}s")
