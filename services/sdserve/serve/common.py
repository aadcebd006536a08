"""What the Serve deployments share: metrics through Ray, log routing, the drain watch."""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Callable
from typing import Any

from sdserve.config import SdserveConfig
from sdserve.metrics import Metrics, Spec, StatsLogger
from sdserve.serve import _ray

# Serve's logger: its lines carry the replica and the request id, and land in Serve's logs.
logger = logging.getLogger("ray.serve")


def ray_metric(spec: Spec, model: str = "") -> Any:
    """The `ray.serve.metrics` object of a spec (Ray adds the deployment, replica and
    application labels, and exports it on the node's metrics port). Every series has a `model`
    label: the replica's model for a stage replica, the request's model where a recording
    names one (`RequestServed`), else empty."""
    from ray.serve import metrics as serve_metrics

    kinds = {"counter": serve_metrics.Counter, "gauge": serve_metrics.Gauge,
             "histogram": serve_metrics.Histogram}  # fmt: skip
    kwargs: dict[str, Any] = {"description": spec.description, "tag_keys": (*spec.tags, "model")}
    if spec.kind == "histogram":
        kwargs["boundaries"] = list(spec.buckets)
    metric = kinds[spec.kind](spec.name, **kwargs)
    metric.set_default_tags({"model": model})
    return metric


def replica_setup(config: dict, model: str = "") -> tuple[SdserveConfig, StatsLogger]:
    """Every replica's first step: validate the config tree it was given, send sdserve's log
    lines to Serve's replica log, and build its stats logger (metrics through Ray unless
    `metrics.enabled` is false; labelled with the replica's `model`, empty for the ingress and
    job workers, which serve every model)."""
    tree = SdserveConfig.model_validate(config)
    route_logs_to_serve()
    _ray.quiet_polls()
    factory = functools.partial(ray_metric, model=model) if tree.metrics.enabled else None
    return tree, StatsLogger(Metrics(factory))


def route_logs_to_serve() -> None:
    """Sends the log lines of sdserve's own modules (logger "sdserve") through Serve's replica
    handlers, so that they carry the replica and the request id and land in the replica's log
    file like Serve's own lines."""
    ours, serves = logging.getLogger("sdserve"), logging.getLogger("ray.serve")
    if serves.handlers and not ours.handlers:
        for handler in serves.handlers:
            ours.addHandler(handler)
        ours.setLevel(logging.INFO)
        ours.propagate = False


async def watch_drain(app_name: str, on_drain: Callable[[], None], every_s: float = 0.5) -> None:
    """Calls `on_drain()` once `sdserve serve` has set the app's drain flag (a replica's
    background task). The KV read is the GCS client's asynchronous one, so the event loop never
    blocks on it (the blocking read made from another thread of a replica hung: commit
    07e905e). A read that fails is logged and the watch goes on, so that a drain set later is
    still seen."""
    while True:
        try:
            if await _ray.is_draining_async(app_name):
                break
        except Exception:
            logger.warning("reading the drain flag of app %s failed; still watching", app_name,
                           exc_info=True)  # fmt: skip
        await asyncio.sleep(every_s)
    on_drain()
