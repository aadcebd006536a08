"""The application graph, built in one place.

    gRPC client -> Serve gRPC proxy -> Pipeline -> TextEncoder (+ VaeEncoder), Denoiser, VaeDecoder
                                          |  (jobs) -> Redis -> JobWorker -> the same three

Each model's stage deployments are bound in `sdserve.serve.model_apps`, which also builds the
applications of models added at runtime (one application per model, `sdserve.serve.admin`).
Per model: SD3 and FLUX take no image inputs, so they have no VaeEncoder; with
`stages.text_encoder_t5` their T5 encoder is a deployment of its own (TextEncoderT5).

`build_app(config)` is what `sdserve serve` runs. `app_builder` is the import path for Ray's own
tools: `serve run deploy/serve_config.yaml` / `serve deploy` pass the config tree as `args`.
"""

from __future__ import annotations

from typing import Any

from ray import serve
from ray.serve import Application

from sdserve.config import ModelConfig, SdserveConfig
from sdserve.serve import _ray
from sdserve.serve.client import StageHandles
from sdserve.serve.ingress import PipelineIngress
from sdserve.serve.job_worker import JobWorkerDeployment
from sdserve.serve.model_apps import deployment_name, model_app_name
from sdserve.serve.stages import (
    DenoiserDeployment,
    SafetyCheckerDeployment,
    TextEncoderDeployment,
    TextEncoderT5Deployment,
    VaeDecoderDeployment,
    VaeEncoderDeployment,
)
from sdserve.stages.runtime import model_stages

GRPC_SERVICER_FUNCTIONS = [
    "sdserve.serve._ray.add_diffusion_service",
    "grpc_health.v1.health_pb2_grpc.add_HealthServicer_to_server",
]
"""What Serve's gRPC proxy must register (`grpc_options.grpc_servicer_functions`)."""


STAGE_DEPLOYMENTS = {
    "text_encoder": TextEncoderDeployment,
    "denoiser": DenoiserDeployment,
    "vae_decoder": VaeDecoderDeployment,
    "vae_encoder": VaeEncoderDeployment,
    "text_encoder_t5": TextEncoderT5Deployment,
    "safety_checker": SafetyCheckerDeployment,
}
"""The deployment class of each stage, by its name in `config.stages` and `StageHandles`. A
model has the first three; `model_stages` says which of the others."""


def bind_model_stages(config: SdserveConfig, model: ModelConfig, default: bool) -> StageHandles:
    """`model`'s stage deployments (`model_stages`), bound with the whole config tree; placement
    from the model's own `stages`, else the shared `config.stages`."""
    tree = config.model_dump()
    bound = {}
    for stage in model_stages(config, model):
        options = config.stage(stage, model).deployment_options()
        name = deployment_name(stage, model.name, default)
        bound[stage] = STAGE_DEPLOYMENTS[stage].options(name=name, **options).bind(tree, model.name)
    return StageHandles(**bound)


def build_app(config: SdserveConfig) -> Application:
    """Binds each served model's stage deployments, the job workers and the ingress."""
    tree = config.model_dump()
    models = {
        model.name: bind_model_stages(config, model, default=i == 0)
        for i, model in enumerate(config.served_models)
    }
    stages = config.stages
    job_worker = None
    if stages.job_worker.num_replicas or stages.job_worker.autoscaling:
        options = stages.job_worker.deployment_options()
        job_worker = JobWorkerDeployment.options(**options).bind(models, tree)
    return PipelineIngress.options(**stages.ingress.deployment_options()).bind(
        models, job_worker, tree
    )


@serve.deployment(name="ModelApp", num_replicas=1, ray_actor_options={"num_cpus": 0})
class ModelAppDeployment:
    """The ingress of an added model's application: holds its stage deployments (so that Serve
    deploys them with it) and answers nothing else."""

    def __init__(self, stages: StageHandles):
        self.stages = stages

    def Ping(self, request: bytes = b"") -> bytes:
        return b"ok"


def build_model_app(config: SdserveConfig, model: ModelConfig) -> Application:
    """The application of a model added at runtime (`sdserve.serve.admin`): its stage
    deployments under a small ingress of their own (`ModelApp`), so that deploying or deleting
    it leaves every other application's replicas as they are (Serve redeploys an application
    as a whole). `config` must serve `model` (its stages find their settings by its name)."""
    stages = bind_model_stages(config, model, default=False)
    return ModelAppDeployment.options(name=f"Model-{model.name}").bind(stages)


def deploy_model_app(tree: dict, model: dict) -> str:
    """Starts deploying an added model (`model`, a ModelConfig's fields) beside the application
    of `tree` (the config tree) and returns its application's name at once. AdminService runs
    this in a Ray task: building the application imports the stage classes (torch and
    diffusers), which the ingress must not."""
    config = SdserveConfig.model_validate(tree)
    added = ModelConfig.model_validate(model)
    app = model_app_name(config.server.app_name, added.name)
    _ray.deploy_app(build_model_app(config.with_model(added), added), app)
    return app


def app_builder(args: dict[str, Any]) -> Application:
    """Entry point for `serve run` / `serve deploy`: `args` is (part of) the config tree."""
    return build_app(SdserveConfig.model_validate(args or {}))
