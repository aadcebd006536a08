"""Placement and scale of sdserve's Ray Serve deployments: part of the one config tree
(`sdserve.config`, which re-exports these classes)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class Strict(BaseModel):
    """A config section: unknown keys are errors, values are frozen."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class AutoscalingConfig(Strict):
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


class StageConfig(Strict):
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


class StagesConfig(Strict):
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

    text_encoder_t5: StageConfig | None = None
    """SD3 and FLUX only: the `TextEncoderT5` deployment, T5 as a stage of its own (T5-XXL,
    4.7 B parameters, is larger than SD 1.5 whole: place and scale it apart from the CLIP
    encoders). None: T5 runs in the `TextEncoder` deployment. U-Net models ignore it."""

    safety_checker: StageConfig = StageConfig(max_ongoing_requests=4096)
    """The `SafetyChecker` deployment of each model with `safety` on (flag or block): decodes
    the VaeDecoder's PNGs and runs the checker, batched across requests; queue as the
    TextEncoder. Models with `safety: off` have none."""

    job_worker: StageConfig = StageConfig()
    """The `JobWorker` deployment: each replica runs `jobs.concurrency` queued jobs at a time
    through the same stages as Generate."""

    @model_validator(mode="after")
    def _check(self) -> StagesConfig:
        for name in (
            "ingress",
            "text_encoder",
            "denoiser",
            "vae_decoder",
            "vae_encoder",
            "safety_checker",
        ):
            if getattr(self, name).num_replicas < 1:
                raise ValueError(f"stages.{name}.num_replicas must be at least 1")
        return self
