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

from ray.serve import Application

from sdserve.config import SdserveConfig
from sdserve.serve.ingress import PipelineIngress
from sdserve.serve.job_worker import JobWorkerDeployment
from sdserve.serve.model_apps import bind_model_stages

GRPC_SERVICER_FUNCTIONS = [
    "sdserve.serve._ray.add_diffusion_service",
    "grpc_health.v1.health_pb2_grpc.add_HealthServicer_to_server",
]
"""What Serve's gRPC proxy must register (`grpc_options.grpc_servicer_functions`)."""


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


def app_builder(args: dict[str, Any]) -> Application:
    """Entry point for `serve run` / `serve deploy`: `args` is (part of) the config tree."""
    return build_app(SdserveConfig.model_validate(args or {}))
