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
from pydantic import Field, model_validator

from sdserve.config.deployments import (  # the deployments' part of the tree, re-exported here
    AutoscalingConfig,  # noqa: F401
    StageConfig,
    StagesConfig,
    Strict,
)
from sdserve.config.safety import SafetyMode, check_safety_folders
from sdserve.config.service import (  # the endpoints, jobs and metrics, re-exported here
    HttpConfig,
    JobsConfig,
    MetricsConfig,
    ServerConfig,
    WebhooksConfig,
)
from sdserve.config.tenants import TenantLimitConfig
from sdserve.constants import UNET_SCHEDULER_NAMES, resolve_model_dir

MODEL_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]*$"


class LimitsConfig(Strict):
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

    max_image_bytes: int = Field(12 * 2**20, ge=1024)
    """Largest image input (`init_image`, `mask_image`), in bytes as sent: 12 MiB, an
    uncompressed RGB image at 2048x2048. Checked before the image is decoded (on the HTTP API,
    before its base64 is), so an oversized one costs no decoding."""

    max_message_bytes: int = Field(64 * 1024 * 1024, ge=1024 * 1024)
    """Largest gRPC message the front door receives or sends (requests carry images; a reply
    carries up to `max_num_images` PNGs)."""

    max_cache_interval: int = Field(10, ge=1)
    """Largest DeepCache interval a request may ask for (`cache_interval`)."""

    max_loras_per_request: int = Field(4, ge=0)
    """Most LoRA adapters one request may apply."""

    min_lora_scale: float = -2.0
    """Smallest LoRA scale a request may ask for."""

    max_lora_scale: float = 2.0
    """Largest LoRA scale a request may ask for."""

    max_controls: int = Field(4, ge=0)
    """Most ControlNet entries one request may give (`GenerateRequest.controls`)."""

    min_control_scale: float = 0.0
    """Smallest ControlNet conditioning scale a request may ask for."""

    max_control_scale: float = 2.0
    """Largest ControlNet conditioning scale a request may ask for."""


class DefaultsConfig(Strict):
    """Values used for request fields the client leaves unset."""

    steps: int = Field(25, ge=1)
    """Denoising steps."""

    guidance_scale: float = Field(7.5, ge=0)
    """Classifier-free guidance scale."""

    scheduler: Literal[UNET_SCHEDULER_NAMES] = "dpmpp_2m"  # type: ignore[valid-type]
    """Sampler."""

    strength: float = Field(0.8, gt=0, le=1)
    """Image-to-image and inpainting: the share of the schedule that repaints the init image."""


class EngineConfig(Strict):
    """The Denoiser engine (one per Denoiser replica)."""

    batching: Literal["step", "request"] = "step"
    """step: continuous batching, requests join and leave the running batch between U-Net
    steps. request: whole requests are batched (as Ray Serve's @serve.batch does); for
    comparison."""

    max_batch_size: int = Field(16, ge=1)
    """Most images in one U-Net forward (classifier-free guidance doubles the rows)."""

    scheduling: Literal["priority", "fifo"] = "priority"
    """priority: interactive requests (Generate, GenerateStream, HTTP) before bulk ones (jobs,
    by their priority), earliest deadline first within a class, tenants in turn, and bulk
    requests paused at a step boundary while interactive ones run (sdserve/pipeline/
    scheduling.py). fifo: first come, first served, every running request in every forward of
    its size; for comparison (bench/bench_slo.py)."""

    bulk_images_with_interactive: int = Field(0, ge=0)
    """With `scheduling: priority`: bulk images that may share forwards with interactive
    requests (the rest pause). 0 on a CPU, where every row lengthens a forward; on a GPU, where
    a forward's time hardly grows up to some batch size, raise it to keep jobs moving."""

    max_request_s: float = Field(3600.0, gt=0)
    """Longest a request may take when its client set no deadline: every stage call and the
    wait for the Denoiser's answer end there with DEADLINE_EXCEEDED, so that no request waits
    forever on a stage that never answers."""

    lora_cache_mb: int = Field(1024, ge=1)
    """Memory for loaded LoRA adapters per Denoiser (and TextEncoder) replica; the least
    recently used adapter not in use is dropped beyond it."""

    controlnet_cache_mb: int = Field(4096, ge=1)
    """Memory for loaded ControlNets per Denoiser replica (an SD 1.5 net is 1.4 GB in float32);
    the least recently used net that no live request holds is dropped beyond it."""

    lora_policy: Literal["mixed", "one_set"] = "mixed"
    """mixed: one U-Net forward holds rows with different LoRA adapters and ControlNets (each
    row its own). one_set: a forward holds rows of one adapter set only (the same LoRA adapters
    and scales, the same ControlNets), as servers that bind one adapter or ControlNet to a batch
    do; for comparison (bench/bench_lora.py, bench/bench_controlnet.py; the sets:
    pipeline/adapter_sets.py)."""

    compile: Literal["auto", "off", "default", "max-autotune"] = "auto"
    """torch.compile of the U-Net's forwards (sdserve/pipeline/compiled.py): off (eager),
    default or max-autotune (torch.compile's modes). auto: max-autotune on CUDA; on a CPU,
    default for a small U-Net (a forward of one guided image under a second, where compiling
    was measured faster) and off for a large one (SD 1.5's ran slower compiled). Compiled and
    warmed at start-up (about 2 minutes for the built-in model on 2 CPU cores), counted in
    sdserve_compiles_total. Forwards with LoRA adapters or DeepCache, and forwards larger than
    the largest bucket, run eagerly."""

    compile_shapes: Literal["auto", "dynamic", "buckets"] = "auto"
    """dynamic: one graph for every row count and size (auto on a CPU, where it runs as fast
    as specialised graphs); buckets: rows padded to `compile_buckets`, one static graph each
    (auto on CUDA, where CUDA graphs need static shapes)."""

    compile_buckets: tuple[int, ...] = (1, 2, 4, 8, 16, 32)
    """Row counts a forward is padded up to with `compile_shapes: buckets` (one graph each)."""

    compile_sizes: tuple[tuple[int, int], ...] = ()
    """(width, height) of images to warm up for besides the model's native size. With
    buckets, a request of another size compiles its bucket when it first arrives (a
    recompile, counted)."""

    batch_invariant: bool = False
    """Run each image's rows in a U-Net forward of their own, and decode each request's latents
    alone, so that an image's pixels never depend on what it is batched with, on any backend.
    Measured on this project's CPU, bfloat16 U-Net rows already came out at 0/255 batched or
    alone, eager and compiled, while a batched VAE decode differs from a lone one by up to
    2/255 on a few pixels (docs/precision-and-compilation.md). Costs the step batch's and the
    decode batch's speed-ups."""

    deepcache_levels: int = Field(0, ge=0)
    """Depth of DeepCache's shallow branch (requests' `cache_interval`): 0 runs only the last
    up block's last layer between full steps (the paper's setting for SD, the cheapest); k runs
    the first k levels of the U-Net whole (costlier, closer to exact). Below the U-Net's depth."""

    @model_validator(mode="after")
    def _check(self) -> EngineConfig:
        if not self.compile_buckets or min(self.compile_buckets) < 1:
            raise ValueError("engine.compile_buckets: one or more row counts, each at least 1")
        for width, height in self.compile_sizes:
            if width < 8 or height < 8 or width % 8 or height % 8:
                raise ValueError(f"engine.compile_sizes: {width}x{height} is not a size of "
                                 "multiples of 8")  # fmt: skip
        return self


class AdmissionConfig(Strict):
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


class ModelStagesConfig(Strict):
    """One model's own placement and scale of its stage deployments; an unset entry takes the
    shared one in `stages`."""

    text_encoder: StageConfig | None = None
    denoiser: StageConfig | None = None
    vae_decoder: StageConfig | None = None
    vae_encoder: StageConfig | None = None
    text_encoder_t5: StageConfig | None = None
    safety_checker: StageConfig | None = None


class ModelConfig(Strict):
    name: str = Field("default", pattern=MODEL_NAME_PATTERN, max_length=64)
    """What requests call it (`GenerateRequest.model`, `sdserve generate --model NAME`)."""

    path: str | None = None
    """A diffusers-format model folder. None: the built-in default model, which ships with
    sdserve (`sdserve/default_model/`)."""

    scheduler: Literal[UNET_SCHEDULER_NAMES] | None = None  # type: ignore[valid-type]
    """The sampler of requests to this model that name none. None: `defaults.scheduler`."""

    stages: ModelStagesConfig = Field(default_factory=ModelStagesConfig)
    """This model's own deployment settings (replicas, GPUs, ...), stage by stage."""

    allow_pickle: bool = False
    """Load weights from pickled files (`.bin`, `.pt`, `.ckpt`) where a part has no
    `.safetensors`. Unpickling runs code from the file: leave it off unless you trust the folder
    (or convert it to safetensors). Off, such a folder is refused, naming the file."""

    lora_dir: str | None = None
    """Its LoRA adapters (`GenerateRequest.loras`): NAME.safetensors files or NAME/ folders.
    None: `loras/` inside the model folder (the built-in model ships `loras/cyan`). Every node
    running its TextEncoder or Denoiser must see it."""

    controlnet_dir: str | None = None
    """Its ControlNets (`GenerateRequest.controls`): one diffusers `ControlNetModel` folder per
    net, named as requests name it. None: `controlnets/` inside the model folder. A relative
    path is relative to the model folder. Every node running its Denoiser must see it."""

    device: Literal["auto", "cpu", "cuda"] = "auto"
    """Where the stages run. auto: CUDA when the replica sees a GPU, else CPU."""

    dtype: Literal["auto", "float32", "float16", "bfloat16"] = "auto"
    """The stages' dtype (their weights and forwards; latents and the schedulers' arithmetic
    stay float32). auto: float16 on CUDA; bfloat16 on a CPU with bf16 matmuls in hardware
    (AMX or avx512_bf16, as torch reports it), float32 on other CPUs (sdserve/pipeline/
    precision.py)."""

    safety: SafetyMode = "off"
    """The safety checker after the VAE decoder (diffusers' StableDiffusionSafetyChecker, in a
    SafetyChecker deployment of its own; docs/models-and-adapters.md). off: none. flag: each
    image is marked (`Image.nsfw`, the HTTP API's `nsfw_content_detected`, the PNG's `safety`
    text), its pixels unchanged. block: each flagged image is also replaced by a black one, as
    diffusers does (`Image.blocked`)."""

    safety_checker_dir: str | None = None
    """Where the checker's weights are: a folder with `safety_checker/` and
    `feature_extractor/`, or one holding both at its root. A relative path is relative to the
    model folder. None: the model folder's own `safety_checker/` and `feature_extractor/`."""

    @model_validator(mode="after")
    def _check_safety(self) -> ModelConfig:
        if self.safety != "off":
            check_safety_folders(resolve_model_dir(self.path), self.safety_checker_dir, self.name)
        return self


class SdserveConfig(Strict):
    """The whole configuration."""

    model: ModelConfig = Field(default_factory=ModelConfig)
    """The model served when `models` is empty."""
    models: list[ModelConfig] = Field(default_factory=list)
    """Several models served side by side, each with its own stage deployments; the first is
    the default. Empty: `model` alone."""
    limits: LimitsConfig = Field(default_factory=LimitsConfig)
    defaults: DefaultsConfig = Field(default_factory=DefaultsConfig)
    engine: EngineConfig = Field(default_factory=EngineConfig)
    admission: AdmissionConfig = Field(default_factory=AdmissionConfig)
    stages: StagesConfig = Field(default_factory=StagesConfig)
    server: ServerConfig = Field(default_factory=ServerConfig)
    jobs: JobsConfig = Field(default_factory=JobsConfig)
    http: HttpConfig = Field(default_factory=HttpConfig)
    metrics: MetricsConfig = Field(default_factory=MetricsConfig)
    webhooks: WebhooksConfig = Field(default_factory=WebhooksConfig)
    tenants: dict[str, TenantLimitConfig] = Field(default_factory=dict)
    """Rate and concurrency limits per tenant, by name; the entry `default` covers tenants not
    listed (sdserve/config/tenants.py). Empty: every tenant is unlimited."""

    @model_validator(mode="after")
    def _check(self) -> SdserveConfig:
        if self.limits.min_size > self.limits.max_size:
            raise ValueError("limits.min_size is larger than limits.max_size")
        if self.defaults.steps > self.limits.max_steps:
            raise ValueError("defaults.steps is larger than limits.max_steps")
        if (self.server.ssl_keyfile is None) != (self.server.ssl_certfile is None):
            raise ValueError("server.ssl_keyfile and server.ssl_certfile go together")
        if self.models and self.model != ModelConfig():  # (a dumped tree holds both)
            raise ValueError("set either model (one model) or models (several), not both")
        names = [m.name for m in self.models]
        if len(set(names)) != len(names):
            raise ValueError(f"models: names must be unique, got {names}")
        return self

    @property
    def served_models(self) -> tuple[ModelConfig, ...]:
        """The models served, the default first."""
        return tuple(self.models) or (self.model,)

    def model_named(self, name: str | None = None) -> ModelConfig:
        """A served model by name (None: the default). Raises KeyError."""
        if name is None:
            return self.served_models[0]
        for model in self.served_models:
            if model.name == name:
                return model
        raise KeyError(name)

    def with_model(self, model: ModelConfig) -> SdserveConfig:
        """This config serving `model` too, last (a model added at runtime)."""
        return self.model_copy(
            update={"models": [*self.served_models, model], "model": ModelConfig()}
        )

    def without_model(self, name: str) -> SdserveConfig:
        """This config without the served model `name` (one removed at runtime)."""
        models = [m for m in self.served_models if m.name != name]
        return self.model_copy(update={"models": models, "model": ModelConfig()})

    def stage(self, stage: str, model: ModelConfig | None = None) -> StageConfig:
        """The deployment settings of `model`'s stage (its own, else the shared ones)."""
        own = getattr(model.stages, stage, None) if model is not None else None
        return own or getattr(self.stages, stage)


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
    "SDSERVE_WEBHOOK_SECRET": ("webhooks", "secret"),
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
