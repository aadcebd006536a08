"""The one configuration tree of sdserve, and the only module that reads environment variables.

A config comes from, in order of precedence: command-line flags, a YAML file (`--config`), the
environment variables listed in `ENV_VARS`, then the defaults below. Every deployment receives the
whole tree as a plain dict (`SdserveConfig.model_dump()`) and validates it again on its side.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, model_validator

from sdserve.constants import SCHEDULER_NAMES


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelConfig(_Strict):
    path: str | None = None
    """A diffusers-format model folder. None: the built-in default model, which ships with
    sdserve (`sdserve/default_model/`)."""

    device: Literal["auto", "cpu", "cuda"] = "auto"
    """Where the stages run. auto: CUDA when the replica sees a GPU, else CPU."""

    dtype: Literal["auto", "float32", "float16", "bfloat16"] = "auto"
    """Weights' dtype. auto: float16 on CUDA, float32 on CPU."""


class LimitsConfig(_Strict):
    """Bounds that requests are validated against (INVALID_ARGUMENT when out of bounds)."""

    max_prompt_chars: int = Field(1000, ge=1)
    """Longest prompt or negative prompt, in characters."""

    min_size: int = Field(8, ge=8)
    """Smallest width or height, in pixels."""

    max_size: int = Field(2048, ge=8)
    """Largest width or height, in pixels."""

    max_pixels: int = Field(1024 * 1024, ge=64)
    """Largest width * height."""

    max_steps: int = Field(150, ge=1)
    """Most denoising steps per request."""

    max_num_images: int = Field(8, ge=1)
    """Most images per request."""

    max_cache_interval: int = Field(10, ge=1)
    """Largest DeepCache interval a request may ask for (`cache_interval`)."""


class DefaultsConfig(_Strict):
    """Values used for request fields the client leaves unset."""

    steps: int = Field(25, ge=1)
    """Denoising steps."""

    guidance_scale: float = Field(7.5, ge=0)
    """Classifier-free guidance scale."""

    scheduler: Literal[SCHEDULER_NAMES] = "dpmpp_2m"  # type: ignore[valid-type]
    """Sampler."""

    strength: float = Field(0.8, gt=0, le=1)
    """Image-to-image and inpainting: the share of the schedule that repaints the init image."""


class EngineConfig(_Strict):
    """The Denoiser engine (one per Denoiser replica)."""

    batching: Literal["step", "request"] = "step"
    """step: continuous batching, requests join and leave the running batch between U-Net
    steps. request: whole requests are batched (as Ray Serve's @serve.batch does); for
    comparison."""

    max_batch_size: int = Field(16, ge=1)
    """Most images in one U-Net forward (classifier-free guidance doubles the rows)."""

    deepcache_levels: int = Field(0, ge=0)
    """Depth of DeepCache's shallow branch (requests' `cache_interval`): 0 runs only the last
    up block's last layer between full steps (the paper's setting for SD, the cheapest); k runs
    the first k levels of the U-Net whole (costlier, closer to exact). Below the U-Net's depth."""


class AdmissionConfig(_Strict):
    """Load shedding at the ingress (sdserve/orchestration/admission.py): a request that would
    wait too long, or end after its deadline, is refused RESOURCE_EXHAUSTED at once, with a
    `retry-after-s` hint in the trailing metadata."""

    enabled: bool = True

    max_wait_s: float = Field(60.0, gt=0)
    """Refuse a request expected to wait longer than this for the Denoiser, deadline or not."""

    margin: float = Field(1.25, ge=1.0)
    """Admit only when this times the expected end (plus slack_s) is before the deadline."""

    slack_s: float = Field(1.0, ge=0)

    poll_s: float = Field(0.2, gt=0)
    """How often the ingress reads the Denoiser's load."""


class AutoscalingConfig(_Strict):
    """Ray Serve autoscaling of one deployment, on its ongoing requests per replica. For the
    Denoiser that is queued plus running work: every request waiting for or in the engine's
    batch is an ongoing call."""

    min_replicas: int = Field(1, ge=0)
    max_replicas: int = Field(4, ge=1)
    target_ongoing_requests: float = Field(8.0, gt=0)
    """Serve adds replicas when the average per replica is above this, removes them below."""

    upscale_delay_s: float = Field(30.0, ge=0)
    """How long the load must stay above the target before a replica is added."""

    downscale_delay_s: float = Field(600.0, ge=0)
    """How long the load must stay below the target before a replica is removed."""

    look_back_period_s: float = Field(30.0, gt=0)
    """The window Serve averages the ongoing requests over."""

    @model_validator(mode="after")
    def _check(self) -> AutoscalingConfig:
        if self.min_replicas > self.max_replicas:
            raise ValueError("min_replicas is larger than max_replicas")
        return self


class StageConfig(_Strict):
    """Placement and scale of one Ray Serve deployment."""

    num_replicas: int = Field(1, ge=0)
    """Replicas of this deployment. 0 only for `job_worker` (a node that serves the API and
    runs no jobs)."""

    num_cpus: float = Field(0.0, ge=0)
    """Logical CPUs reserved per replica."""

    num_gpus: float = Field(0.0, ge=0)
    """GPUs (fractions allowed) reserved per replica. Set it on GPU clusters, leave 0 on CPU."""

    resources: dict[str, float] = Field(default_factory=dict)
    """Custom Ray resources per replica, e.g. {"gpu_node": 0.01} to pin a stage to a node type."""

    torch_threads: int | Literal["auto"] | None = "auto"
    """CPU threads for torch in each replica. auto: every core for a stage whose forward takes a
    second or more (SD 1.5 on a CPU), one thread for small ones, timed when the stage loads,
    for the Denoiser per batch size (sdserve/pipeline/threads.py); nothing is timed on a GPU.
    None: what Ray sets (OMP_NUM_THREADS = the replica's num_cpus, 1 when num_cpus is 0). A
    number: that many."""

    @model_validator(mode="after")
    def _check_threads(self) -> StageConfig:
        if isinstance(self.torch_threads, int) and self.torch_threads < 1:
            raise ValueError("torch_threads must be at least 1, auto or null")
        return self

    max_ongoing_requests: int = Field(16, ge=1)
    """Requests one replica accepts at once before Serve queues them at the caller."""

    autoscaling: AutoscalingConfig | None = None
    """When set, Serve scales the replicas between its bounds and `num_replicas` is ignored."""

    graceful_shutdown_timeout_s: float = Field(20.0, ge=0)
    """On a scale-down or shutdown, how long a replica may finish its running requests."""

    def deployment_options(self) -> dict[str, Any]:
        """This stage's Ray Serve deployment options."""
        options: dict[str, Any] = {
            "ray_actor_options": self.ray_actor_options(),
            "max_ongoing_requests": self.max_ongoing_requests,
            "graceful_shutdown_timeout_s": self.graceful_shutdown_timeout_s,
        }
        if self.autoscaling is None:
            options["num_replicas"] = self.num_replicas
        else:
            options["autoscaling_config"] = self.autoscaling.model_dump()
        return options

    def ray_actor_options(self) -> dict[str, Any]:
        """The `ray_actor_options` of this stage's deployment."""
        options: dict[str, Any] = {"num_cpus": self.num_cpus, "num_gpus": self.num_gpus}
        if self.resources:
            options["resources"] = dict(self.resources)
        return options


class StagesConfig(_Strict):
    """One entry per deployment."""

    ingress: StageConfig = StageConfig(num_replicas=1, max_ongoing_requests=4096)
    """The `Pipeline` deployment that serves DiffusionService and orchestrates the stages."""

    text_encoder: StageConfig = StageConfig(max_ongoing_requests=4096)
    """The `TextEncoder` deployment (tokenizer + CLIP). Its torch thread is its queue; a low
    max_ongoing_requests queues calls in Serve's router instead, which under a flood of
    requests fed the Denoiser in bursts (its U-Net idled a quarter of the time)."""

    denoiser: StageConfig = StageConfig(num_cpus=1.0, max_ongoing_requests=4096)
    """The `Denoiser` deployment (U-Net and the denoising loop). Its engine is its queue: a
    high max_ongoing_requests lets every admitted request reach it (load shedding reads it),
    instead of waiting unseen in Serve's router."""

    vae_decoder: StageConfig = StageConfig(max_ongoing_requests=4096)
    """The `VaeDecoder` deployment (VAE decoder + PNG encoding); queue as the TextEncoder."""

    vae_encoder: StageConfig = StageConfig(max_ongoing_requests=4096)
    """The `VaeEncoder` deployment (image inputs: image decoding + VAE encoder); queue as the
    TextEncoder. Text-to-image requests never call it."""

    job_worker: StageConfig = StageConfig()
    """The `JobWorker` deployment: each replica runs `jobs.concurrency` queued jobs at a time
    through the same stages as Generate."""

    @model_validator(mode="after")
    def _check(self) -> StagesConfig:
        for name in ("ingress", "text_encoder", "denoiser", "vae_decoder", "vae_encoder"):
            if getattr(self, name).num_replicas < 1:
                raise ValueError(f"stages.{name}.num_replicas must be at least 1")
        return self


class JobsConfig(_Strict):
    """The asynchronous job queue (SubmitJob/GetJob/WatchJob/CancelJob) on Redis."""

    redis_url: str = "redis://127.0.0.1:6379/0"
    """Redis holding the queue: redis://[:PASSWORD@]HOST:PORT/DB, rediss://... for TLS, or
    unix:///path/redis.sock. Run it with appendonly on, or a Redis restart loses queued jobs."""

    key_prefix: str = "sdserve:"
    """Prefix of every key sdserve writes (several deployments can share one Redis)."""

    result_ttl_s: int = Field(24 * 3600, ge=1)
    """How long an ended job, its images and its idempotency key are kept."""

    max_queue_length: int = Field(10_000, ge=1)
    """Most jobs waiting or running; SubmitJob answers RESOURCE_EXHAUSTED beyond it."""

    max_attempts: int = Field(3, ge=1)
    """Starts of one job before it is FAILED (a worker died or a stage failed each time)."""

    lease_s: float = Field(30.0, gt=0)
    """A running job whose worker has not renewed its lease for this long is taken over by
    another worker. Workers renew every lease_s / 3."""

    concurrency: int = Field(4, ge=1)
    """Jobs each JobWorker replica runs at once (they batch together in the Denoiser)."""

    timeout_s: float = Field(3600.0, ge=0)
    """An attempt at a job that runs longer than this fails DEADLINE_EXCEEDED (and is not
    tried again): the Denoiser drops it at its next step. 0: no limit."""

    progress_interval_s: float = Field(0.25, ge=0)
    """How often a running job's step is recorded (what WatchJob and GetJob show); the first
    and the last step always are. 0: every step. A cancel reaches a running job at once
    either way."""


class ServerConfig(_Strict):
    """The Ray cluster and the public endpoint."""

    grpc_port: int = Field(9000, ge=1, le=65535)
    """Port of Ray Serve's gRPC proxy, which serves DiffusionService."""

    http_port: int = Field(8000, ge=0, le=65535)
    """Port of Serve's HTTP proxy. sdserve serves nothing over HTTP, but Serve always starts one."""

    host: str = "127.0.0.1"
    """Address the local Ray node binds to (`sdserve serve` without `--address`)."""

    ray_address: str | None = None
    """An existing Ray cluster to join (`ray://host:10001` or `auto`). None: start a local one."""

    stage_transport: Literal["grpc", "actor"] = "grpc"
    """How the ingress calls the stages: Ray Serve's gRPC transport (`_by_reference=False`,
    faster for tensors, see DESIGN.md) or Ray actor calls."""

    app_name: str = "sdserve"
    """Name of the Serve application."""

    api_key_file: str | None = None
    """A file of API keys, one per line, each optionally followed by its tenant (see
    sdserve/auth.py). Set: every DiffusionService call needs `authorization: Bearer KEY` and
    sees only its tenant's jobs. None: anyone who can reach the port may call (start-up says
    so). Every node must see the file at this path."""

    proxy_location: Literal["EveryNode", "HeadOnly"] = "EveryNode"
    """Where Serve runs its gRPC/HTTP proxies: on every node (a load balancer in front spreads
    clients over them), or only on the head node (one public address)."""


class MetricsConfig(_Strict):
    """Prometheus metrics (services/sdserve/metrics.py lists them)."""

    enabled: bool = True
    """Record sdserve's metrics. Ray Serve's own metrics are exported either way."""

    export_port: int = Field(8080, ge=1, le=65535)
    """Port of the local Ray node's Prometheus endpoint (`sdserve serve` without `--address`;
    nodes of an existing cluster use their `ray start --metrics-export-port`)."""

    report_interval_s: float = Field(5.0, ge=1.0)
    """How often replicas push their metrics to the node's endpoint (local Ray only)."""


class SdserveConfig(_Strict):
    """The whole configuration."""

    model: ModelConfig = Field(default_factory=ModelConfig)
    limits: LimitsConfig = Field(default_factory=LimitsConfig)
    defaults: DefaultsConfig = Field(default_factory=DefaultsConfig)
    engine: EngineConfig = Field(default_factory=EngineConfig)
    admission: AdmissionConfig = Field(default_factory=AdmissionConfig)
    stages: StagesConfig = Field(default_factory=StagesConfig)
    server: ServerConfig = Field(default_factory=ServerConfig)
    jobs: JobsConfig = Field(default_factory=JobsConfig)
    metrics: MetricsConfig = Field(default_factory=MetricsConfig)

    @model_validator(mode="after")
    def _check(self) -> SdserveConfig:
        if self.limits.min_size > self.limits.max_size:
            raise ValueError("limits.min_size is larger than limits.max_size")
        if self.defaults.steps > self.limits.max_steps:
            raise ValueError("defaults.steps is larger than limits.max_steps")
        return self


ENV_VARS = {
    "SDSERVE_MODEL": ("model", "path"),
    "SDSERVE_DEVICE": ("model", "device"),
    "SDSERVE_GRPC_PORT": ("server", "grpc_port"),
    "SDSERVE_HTTP_PORT": ("server", "http_port"),
    "SDSERVE_RAY_ADDRESS": ("server", "ray_address"),
    "SDSERVE_STAGE_TRANSPORT": ("server", "stage_transport"),
    "SDSERVE_REDIS_URL": ("jobs", "redis_url"),
    "SDSERVE_API_KEY_FILE": ("server", "api_key_file"),
    "SDSERVE_METRICS_PORT": ("metrics", "export_port"),
}
"""Environment variables and the config field each one sets."""


def _set(tree: dict[str, Any], path: tuple[str, ...], value: Any) -> None:
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


def load_config(
    file: str | os.PathLike[str] | None = None,
    overrides: dict[tuple[str, ...], Any] | None = None,
    environ: dict[str, str] | None = None,
) -> SdserveConfig:
    """Builds the config from a YAML file, the environment and explicit overrides.

    Args:
        file: a YAML file holding (part of) the tree, or None.
        overrides: {("server", "grpc_port"): 9001, ...}; None values are ignored, so unset CLI
            flags can be passed as they are.
        environ: the environment to read (default: os.environ).
    """
    tree: dict[str, Any] = {}
    if file is not None:
        tree = yaml.safe_load(Path(file).read_text()) or {}
        if not isinstance(tree, dict):
            raise ValueError(f"{file}: expected a mapping at the top level")
    environ = os.environ if environ is None else environ
    for name, path in ENV_VARS.items():
        if environ.get(name):
            _set(tree, path, environ[name])
    for path, value in (overrides or {}).items():
        if value is not None:
            _set(tree, path, value)
    return SdserveConfig.model_validate(tree)
