"""Every sdserve metric, defined once, and the one place that records them (`StatsLogger`).

Code that serves requests emits typed stats (`sdserve.stats`); a `StatsLogger` turns them into
the series below and keeps the counters of the Stats RPCs. Replicas record the series with
`ray.serve.metrics` (which adds the deployment, replica and application labels); Ray exports
them, beside Ray Serve's own metrics, on each node's metrics export port (`sdserve serve
--metrics-port`, `ray start --metrics-export-port`). Ray prefixes custom metrics with `ray_`;
deploy/prometheus.yml renames `ray_sdserve_*` back to `sdserve_*` when it scrapes, so
dashboards and queries use the names below. Counters get Prometheus's `_total` suffix,
histograms `_bucket`, `_count` and `_sum` (Ray computes `_sum` from bucket midpoints, so use
the buckets for quantiles and `_count` for rates).

`Metrics()` (no factory) records nothing (`metrics.enabled: false` in the config, and every
process without Ray), which is how bench/bench_metrics.py measures what recording costs.
"""

from __future__ import annotations

import threading
import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

from sdserve import stats

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
         "Time a request waited in the Denoiser before its first denoising step, by class "
         "(interactive: Generate, GenerateStream, HTTP; bulk: jobs).", ("class",),
         tuple(LATENCY_BUCKETS)),
    Spec("sdserve_paused_seconds", "histogram",
         "Time a finished request sat out U-Net steps, paused for interactive requests "
         "(engine.scheduling: priority), by class.", ("class",), tuple(LATENCY_BUCKETS)),
    Spec("sdserve_preemptions", "counter",
         "Times the Denoiser paused a running request at a step boundary, by class.", ("class",)),
    Spec("sdserve_slo_requests", "counter",
         "Requests with a deadline that ended, by class and outcome: met (its images before "
         "the deadline) or missed (DEADLINE_EXCEEDED, or later); met / all is SLO attainment.",
         ("class", "outcome")),
    Spec("sdserve_images_generated", "counter", "Images generated (Generate and jobs)."),
    Spec("sdserve_denoiser_batch_size", "histogram",
         "Images in one U-Net forward of the Denoiser engine's running batch.", (),
         tuple(BATCH_BUCKETS)),
    Spec("sdserve_unet_step_seconds", "histogram",
         "Duration of one batched U-Net step (forward, guidance, scheduler updates).", (),
         tuple(STEP_BUCKETS)),
    Spec("sdserve_denoising_steps", "counter",
         "Image denoising steps done (one per image per U-Net forward); rate() is steps/s."),
    Spec("sdserve_controlnet_image_steps", "counter",
         "Of sdserve_denoising_steps, those a ControlNet conditioned (GenerateRequest.controls)."),
    Spec("sdserve_denoiser_waiting_requests", "gauge",
         "Requests waiting for a slot in a Denoiser replica's running batch."),
    Spec("sdserve_denoiser_running_requests", "gauge",
         "Requests in a Denoiser replica's running batch."),
    Spec("sdserve_denoiser_dropped", "counter",
         "Requests the Denoiser dropped before their last step, never decoded: reason = "
         "cancelled (the caller went away) or deadline (it passed).", ("reason",)),
    Spec("sdserve_unet_busy_ratio", "gauge",
         "Share of the last 10 s a Denoiser replica spent in U-Net steps (forward, guidance, "
         "scheduler updates); 1 means the U-Net never waited."),
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
    Spec("sdserve_compiles", "counter",
         "U-Net graphs the Denoiser compiled (engine.compile), by bucket (rows of the padded "
         "forward) and phase: warmup (start-up) or serving (a recompile).",
         ("bucket", "phase")),
    Spec("sdserve_gpu_memory_bytes", "gauge",
         "CUDA memory of a stage replica, kind = allocated | reserved (CUDA only).",
         ("stage", "kind")),
    Spec("sdserve_tenant_requests", "counter",
         "Requests per tenant and what its limits (`tenants` in the config) decided: outcome = "
         "admitted | rate_limited | concurrency_limited.", ("tenant", "outcome")),
    Spec("sdserve_safety_images", "counter",
         "Images a model's safety checker checked (`safety: flag | block`), by model and "
         "outcome: passed | flagged (marked, pixels kept) | blocked (replaced by black).",
         ("model", "outcome")),
]  # fmt: skip


class _Off:
    """A metric that records nothing."""

    def inc(self, *args: Any, **kwargs: Any) -> None:
        pass

    observe = set = inc


MetricFactory = Callable[[Spec], Any]
"""Builds the metric object of a `Spec` (something with inc / observe / set, as
`ray.serve.metrics` has); `sdserve.serve.common.ray_metric` is the one Serve replicas use."""


class Metrics:
    """The metrics of one process: an attribute per `Spec` (`metrics.images_generated.inc(2)`).

    Build it inside the replica (metric objects do not travel between processes). Without a
    factory it records nothing (`metrics.enabled: false`, and everything that runs without
    Ray).
    """

    def __init__(self, factory: MetricFactory | None = None):
        self.enabled = factory is not None
        for spec in SPECS:
            setattr(self, spec.attr, factory(spec) if factory is not None else _Off())

    def __getattr__(self, name: str) -> Any:  # for type checkers: attributes are set above
        raise AttributeError(name)


def exported_names() -> set[str]:
    """Every series name sdserve exports (as Prometheus holds them)."""
    return {name for spec in SPECS for name in spec.exported_names}


def _predicted(batches, images: int) -> float:
    """Image-steps per second of a forward of `images` images, from a least-squares line of
    seconds against images through `batches` ((time, images, seconds)); 0 with fewer than two
    batch sizes or a line that does not rise."""
    xs = [float(n) for _, n, _ in batches]
    ys = [s for _, _, s in batches]
    if images <= 0 or len(set(xs)) < 2:
        return 0.0
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True))
    slope /= sum((x - mx) ** 2 for x in xs)
    if slope <= 0:
        return 0.0
    intercept = max(0.0, my - slope * mx)
    return images / (intercept + slope * images)


@dataclass
class DenoiserCounters:
    """One Denoiser's counters since it started, for its Stats RPC (`DenoiserStats`)."""

    unet_steps: int = 0
    unet_seconds: float = 0.0
    image_steps: int = 0
    """Images over all U-Net forwards (a forward of 4 images adds 4)."""
    shared_steps: int = 0
    """U-Net forwards that covered images of more than one request."""
    unet_rows: int = 0
    """U-Net batch rows over all steps (guidance adds a row per guided image), shallow ones
    included."""
    shallow_rows: int = 0
    """Of `unet_rows`, the rows that ran only the shallow branch (DeepCache)."""
    finished: int = 0
    cancelled: int = 0
    """Dropped before their end: the caller went away, or (also counted in `expired`) their
    deadline passed."""
    expired: int = 0
    failed: int = 0
    compiles: int = 0
    """U-Net graphs compiled (torch.compile), warm-up included."""
    recompiles: int = 0
    """Of `compiles`, those after warm-up (while serving)."""
    preemptions: int = 0
    """Times a running request was paused at a step boundary (for interactive requests)."""


BUSY_WINDOW_S = 10.0
"""The window of `sdserve_unet_busy_ratio`."""
CAPACITY_WINDOW_S = 60.0
"""The window of the Denoiser's measured capacity (`StatsLogger.capacity`)."""


class StatsLogger:
    """The one place where typed stats (`sdserve.stats`) become metrics and counters.

    Every emitter calls `record(stats)`; `denoiser` and `jobs` hold the counters that the
    Denoiser's Stats RPC and the JobWorker's Stats call report.

    Thread-safe, and the one hand-off of stats between threads: the Denoiser's engine records
    on its torch thread while the Stats RPC reads on the event loop, so recording and every
    read (`unet_busy_ratio`, `capacity`, `denoiser_counters`) hold one lock. Unguarded, a read
    iterating a window while a step appended to it raised "deque mutated during iteration".
    """

    def __init__(self, metrics: Metrics | None = None):
        self.metrics = metrics or Metrics()
        self._lock = threading.RLock()  # RLock: a handler reads the busy ratio it updates
        self.denoiser = DenoiserCounters()
        self.jobs: Counter[str] = Counter()
        self._steps: deque[tuple[float, float]] = deque()  # (ended at, seconds) in the window
        self._busy_s = 0.0  # the sum of `_steps`' seconds
        self._batches: deque[tuple[float, int, float]] = deque()  # (ended at, images, seconds)
        self.full_batch = 0
        """Images in a full forward (`engine.max_batch_size`; the Denoiser sets it): `capacity`
        predicts the speed of one from the forwards of the last minute. 0: no prediction."""
        self._handlers: dict[type, Callable[[Any], None]] = {
            stats.StepStats: self._step,
            stats.RequestAdmitted: self._admitted,
            stats.RequestEnded: self._ended,
            stats.RequestPaused: self._paused,
            stats.DeadlineOutcome: self._deadline,
            stats.RequestServed: self._served,
            stats.RpcDone: self._rpc,
            stats.JobEvent: self._job,
            stats.QueueDepth: self._queue,
            stats.ModelLoaded: self._loaded,
            stats.GpuMemory: self._gpu,
            stats.UNetCompiled: self._compiled,
            stats.TenantRequest: self._tenant,
            stats.ImagesChecked: self._checked,
        }

    def record(self, item: Any) -> None:
        """Records one typed stat (any dataclass of `sdserve.stats`), from any thread."""
        with self._lock:
            self._handlers[type(item)](item)

    def denoiser_counters(self) -> DenoiserCounters:
        """A copy of the Denoiser's counters, all of one moment."""
        with self._lock:
            return replace(self.denoiser)

    def unet_busy_ratio(self, now: float | None = None) -> float:
        """Share of the last BUSY_WINDOW_S seconds spent in U-Net steps."""
        now = time.monotonic() if now is None else now
        with self._lock:
            while self._steps and self._steps[0][0] < now - BUSY_WINDOW_S:
                self._busy_s -= self._steps.popleft()[1]
            if not self._steps:
                self._busy_s = 0.0  # no rounding left over
            return min(1.0, max(self._busy_s, 0.0) / BUSY_WINDOW_S)

    def capacity(self) -> float:
        """Image-steps per second a full engine runs at, for load shedding
        (`sdserve.orchestration.admission`); 0 before any step. The larger of: the speed of the
        last minute's U-Net steps whose batch was at least half the largest in it, and the
        speed of a full forward (`full_batch` images) that a line through those steps' times
        against their images predicts. Without the prediction, a minute of small batches (a
        quiet server) reads as a low capacity, and a burst's first seconds are over-refused."""
        now = time.monotonic()
        with self._lock:
            while self._batches and self._batches[0][0] < now - CAPACITY_WINDOW_S:
                self._batches.popleft()
            batches = list(self._batches)
        if not batches:
            return 0.0
        largest = max(images for _, images, _ in batches)
        full = [(images, s) for _, images, s in batches if 2 * images >= largest]
        measured = sum(images for images, _ in full) / max(sum(s for _, s in full), 1e-9)
        return max(measured, _predicted(batches, self.full_batch))

    def refresh(self) -> None:
        """Updates the gauges that change with time alone (`sdserve_unet_busy_ratio` falls
        while the engine idles); the Denoiser's replica calls it every few seconds."""
        self.metrics.unet_busy_ratio.set(self.unet_busy_ratio())

    def _step(self, s: stats.StepStats) -> None:
        self._steps.append((time.monotonic(), s.duration_s))
        self._busy_s += s.duration_s
        self._batches.append((time.monotonic(), s.batch_size, s.duration_s))
        self.metrics.unet_busy_ratio.set(self.unet_busy_ratio())
        c, m = self.denoiser, self.metrics
        c.unet_steps += 1
        c.unet_seconds += s.duration_s
        c.image_steps += s.batch_size
        c.shared_steps += len(s.request_ids) > 1
        c.unet_rows += s.rows
        c.shallow_rows += s.shallow_rows
        m.denoiser_batch_size.observe(s.batch_size)
        m.unet_step_seconds.observe(s.duration_s)
        m.denoising_steps.inc(s.batch_size)
        if s.controlled:
            m.controlnet_image_steps.inc(s.controlled)
        m.denoiser_waiting_requests.set(s.waiting)
        m.denoiser_running_requests.set(s.running)

    def _admitted(self, s: stats.RequestAdmitted) -> None:
        self.metrics.queue_wait_seconds.observe(s.wait_s, tags={"class": s.request_class})

    def _paused(self, s: stats.RequestPaused) -> None:
        self.denoiser.preemptions += 1
        self.metrics.preemptions.inc(tags={"class": s.request_class})

    def _deadline(self, s: stats.DeadlineOutcome) -> None:
        outcome = "met" if s.met else "missed"
        self.metrics.slo_requests.inc(tags={"class": s.request_class, "outcome": outcome})

    def _ended(self, s: stats.RequestEnded) -> None:
        c = self.denoiser
        setattr(c, s.outcome, getattr(c, s.outcome) + 1)
        if s.outcome in ("cancelled", "expired"):
            c.cancelled += s.outcome == "expired"
            reason = "deadline" if s.outcome == "expired" else "cancelled"
            self.metrics.denoiser_dropped.inc(tags={"reason": reason})
        if s.outcome == "finished":
            self.metrics.paused_seconds.observe(s.paused_s, tags={"class": s.request_class})
        self.metrics.denoiser_waiting_requests.set(s.waiting)  # so that an idle engine reads 0
        self.metrics.denoiser_running_requests.set(s.running)

    def _served(self, s: stats.RequestServed) -> None:
        model = {"model": s.model} if s.model else {}
        for stage, seconds in s.stage_seconds.items():
            self.metrics.stage_latency_seconds.observe(seconds, tags={"stage": stage, **model})
        self.metrics.images_generated.inc(s.images, tags=model or None)

    def _rpc(self, s: stats.RpcDone) -> None:
        self.metrics.requests.inc(tags={"rpc": s.rpc, "code": s.code})
        self.metrics.request_latency_seconds.observe(s.seconds, tags={"rpc": s.rpc})

    def _job(self, s: stats.JobEvent) -> None:
        self.jobs[s.name] += 1
        m = self.metrics
        if s.name == "started":
            m.job_attempts.inc()
        elif s.name in ("succeeded", "failed", "cancelled"):
            m.jobs_finished.inc(tags={"state": s.name.upper()})
        elif s.name == "dead_lettered":
            m.jobs_dead_lettered.inc()

    def _queue(self, s: stats.QueueDepth) -> None:
        self.metrics.redis_up.set(0 if s.lengths is None else 1)
        for priority, n in (s.lengths or {}).items():
            self.metrics.jobs_in_queue.set(n, tags={"priority": priority})

    def _loaded(self, s: stats.ModelLoaded) -> None:
        self.metrics.model_load_seconds.set(s.seconds, tags={"stage": s.stage})

    def _compiled(self, s: stats.UNetCompiled) -> None:
        self.denoiser.compiles += 1
        self.denoiser.recompiles += not s.warmup
        phase = "warmup" if s.warmup else "serving"
        bucket = str(s.bucket) if s.bucket else "dynamic"
        self.metrics.compiles.inc(tags={"bucket": bucket, "phase": phase})

    def _tenant(self, s: stats.TenantRequest) -> None:
        self.metrics.tenant_requests.inc(tags={"tenant": s.tenant, "outcome": s.outcome})

    def _checked(self, s: stats.ImagesChecked) -> None:
        for outcome in ("passed", "flagged", "blocked"):
            if getattr(s, outcome):
                tags = {"model": s.model, "outcome": outcome}
                self.metrics.safety_images.inc(getattr(s, outcome), tags=tags)

    def _gpu(self, s: stats.GpuMemory) -> None:
        for kind, value in (("allocated", s.allocated), ("reserved", s.reserved)):
            self.metrics.gpu_memory_bytes.set(value, tags={"stage": s.stage, "kind": kind})
