"""Every sdserve metric, defined once.

Replicas record them with `ray.serve.metrics` (which adds the deployment, replica and
application labels); Ray exports them, beside Ray Serve's own metrics, on each node's metrics
export port (`sdserve serve --metrics-port`, `ray start --metrics-export-port`). Ray prefixes
custom metrics with `ray_`; deploy/prometheus.yml renames `ray_sdserve_*` back to `sdserve_*`
when it scrapes, so dashboards and queries use the names below. Counters get Prometheus's
`_total` suffix, histograms `_bucket`, `_count` and `_sum` (Ray computes `_sum` from bucket
midpoints, so use the buckets for quantiles and `_count` for rates).

`Metrics(enabled=False)` records nothing (`metrics.enabled: false` in the config), which is how
bench/bench_metrics.py measures what recording costs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

LATENCY_BUCKETS = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300]
STEP_BUCKETS = [0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5]
BATCH_BUCKETS = [1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64]


@dataclass(frozen=True)
class Spec:
    name: str
    kind: str  # counter | gauge | histogram
    description: str
    tags: tuple[str, ...] = ()
    buckets: tuple[float, ...] = ()

    @property
    def attr(self) -> str:
        return self.name.removeprefix("sdserve_")

    @property
    def exported_names(self) -> list[str]:
        """The series names Prometheus holds (after deploy/prometheus.yml's renaming)."""
        if self.kind == "counter":
            return [f"{self.name}_total"]
        if self.kind == "histogram":
            return [f"{self.name}_{suffix}" for suffix in ("bucket", "count", "sum")]
        return [self.name]


SPECS = [
    Spec("sdserve_requests", "counter",
         "Public RPCs handled, by method and gRPC status code.", ("rpc", "code")),
    Spec("sdserve_request_latency_seconds", "histogram",
         "Time from an RPC reaching the ingress to its answer (to the stream's end).", ("rpc",),
         tuple(LATENCY_BUCKETS)),
    Spec("sdserve_stage_latency_seconds", "histogram",
         "Time one request spent in a stage, seen by its caller (transport included).",
         ("stage",), tuple(LATENCY_BUCKETS)),
    Spec("sdserve_queue_wait_seconds", "histogram",
         "Time a request waited in the Denoiser before its first denoising step.", (),
         tuple(LATENCY_BUCKETS)),
    Spec("sdserve_images_generated", "counter", "Images generated (Generate and jobs)."),
    Spec("sdserve_denoiser_batch_size", "histogram",
         "Images in one U-Net forward of the Denoiser engine's running batch.", (),
         tuple(BATCH_BUCKETS)),
    Spec("sdserve_unet_step_seconds", "histogram",
         "Duration of one batched U-Net step (forward, guidance, scheduler updates).", (),
         tuple(STEP_BUCKETS)),
    Spec("sdserve_denoising_steps", "counter",
         "Image denoising steps done (one per image per U-Net forward); rate() is steps/s."),
    Spec("sdserve_denoiser_waiting_requests", "gauge",
         "Requests waiting for a slot in a Denoiser replica's running batch."),
    Spec("sdserve_denoiser_running_requests", "gauge",
         "Requests in a Denoiser replica's running batch."),
    Spec("sdserve_jobs_in_queue", "gauge",
         "Jobs waiting or running, per priority (read from Redis by the ingress).",
         ("priority",)),
    Spec("sdserve_jobs_finished", "counter",
         "Jobs that ended, by final state (SUCCEEDED, FAILED, CANCELLED).", ("state",)),
    Spec("sdserve_job_attempts", "counter",
         "Attempts started (a job's second attempt means its first worker died or failed)."),
    Spec("sdserve_jobs_dead_lettered", "counter",
         "Jobs FAILED because they used up jobs.max_attempts."),
    Spec("sdserve_redis_up", "gauge", "1 when the job queue's Redis answered the last poll."),
    Spec("sdserve_model_load_seconds", "gauge",
         "Time the replica took to load its part of the model.", ("stage",)),
    Spec("sdserve_gpu_memory_bytes", "gauge",
         "CUDA memory of a stage replica, kind = allocated | reserved (CUDA only).",
         ("stage", "kind")),
]  # fmt: skip


class _Off:
    """A metric that records nothing."""

    def inc(self, *args: Any, **kwargs: Any) -> None:
        pass

    observe = set = inc


class Metrics:
    """The metrics of one process: an attribute per `Spec` (`metrics.images_generated.inc(2)`).

    Build it inside the replica (metric objects do not travel between processes).
    """

    def __init__(self, enabled: bool = True):
        self.enabled = enabled
        if enabled:
            from ray.serve import metrics as serve_metrics

            kinds = {
                "counter": serve_metrics.Counter,
                "gauge": serve_metrics.Gauge,
                "histogram": serve_metrics.Histogram,
            }
        for spec in SPECS:
            if not enabled:
                setattr(self, spec.attr, _Off())
                continue
            kwargs: dict[str, Any] = {"description": spec.description, "tag_keys": spec.tags}
            if spec.kind == "histogram":
                kwargs["boundaries"] = list(spec.buckets)
            setattr(self, spec.attr, kinds[spec.kind](spec.name, **kwargs))

    def __getattr__(self, name: str) -> Any:  # for type checkers: attributes are set above
        raise AttributeError(name)


def exported_names() -> set[str]:
    """Every series name sdserve exports (as Prometheus holds them)."""
    return {name for spec in SPECS for name in spec.exported_names}
