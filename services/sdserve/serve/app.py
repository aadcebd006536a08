"""The application graph, built in one place.

    gRPC client -> Serve gRPC proxy -> Pipeline -> TextEncoder (+ VaeEncoder), Denoiser, VaeDecoder
                                          |  (jobs) -> Redis -> JobWorker -> the same three

Per model: SD3 and FLUX take no image inputs, so they have no VaeEncoder; with
`stages.text_encoder_t5` their T5 encoder is a deployment of its own (TextEncoderT5).

`build_app(config)` is what `sdserve serve` runs. `app_builder` is the import path for Ray's own
tools: `serve run deploy/serve_config.yaml` / `serve deploy` pass the config tree as `args`.
"""

from __future__ import annotations

from typing import Any

from ray.serve import Application

from sdserve.config import SdserveConfig
from sdserve.serve.client import StageHandles
from sdserve.serve.ingress import PipelineIngress
from sdserve.serve.job_worker import JobWorkerDeployment
from sdserve.serve.stages import (
    DenoiserDeployment,
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
}
"""The deployment class of each stage, by its name in `config.stages` and `StageHandles`. A
model has the first three; `model_stages` says which of the others."""


def deployment_name(stage: str, model: str, default: bool) -> str:
    """A stage deployment's name: "Denoiser" for the default model (so a one-model server's
    names, dashboards and deploy files do not change), "Denoiser-NAME" for the others."""
    base = STAGE_DEPLOYMENTS[stage].func_or_class.__name__.removesuffix("Deployment")
    return base if default else f"{base}-{model}"


def build_app(config: SdserveConfig) -> Application:
    """Binds each served model's stage deployments (`model_stages`; placement from the
    model's own `stages`, else the shared `config.stages`), the job workers and the ingress."""
    tree = config.model_dump()
    models = {}
    for i, model in enumerate(config.served_models):
        bound = {}
        for stage in model_stages(config, model):
            options = config.stage(stage, model).deployment_options()
            name = deployment_name(stage, model.name, default=i == 0)
            deployment = STAGE_DEPLOYMENTS[stage].options(name=name, **options)
            bound[stage] = deployment.bind(tree, model.name)
        models[model.name] = StageHandles(**bound)
    stages = config.stages
    job_worker = None
    if stages.job_worker.num_replicas or stages.job_worker.autoscaling:
        options = stages.job_worker.deployment_options()
        job_worker = JobWorkerDeployment.options(**options).bind(models, tree)
    return PipelineIngress.options(**stages.ingress.deployment_options()).bind(
        models, job_worker, tree
    )


def app_builder(args: dict[str, Any]) -> Application:
    """Entry point for `serve run` / `serve deploy`: `args` is (part of) the config tree."""
    return build_app(SdserveConfig.model_validate(args or {}))
