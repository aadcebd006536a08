"""The application graph, built in one place.

    gRPC client -> Serve gRPC proxy -> Pipeline -> TextEncoder (+ VaeEncoder), Denoiser, VaeDecoder
                                          |  (jobs) -> Redis -> JobWorker -> the same three

`build_app(config)` is what `sdserve serve` runs. `app_builder` is the import path for Ray's own
tools: `serve run deploy/serve_config.yaml` / `serve deploy` pass the config tree as `args`.
"""

from __future__ import annotations

from typing import Any

from ray.serve import Application

from sdserve.config import SdserveConfig
from sdserve.serve.ingress import PipelineIngress
from sdserve.serve.job_worker import JobWorkerDeployment
from sdserve.serve.stages import (
    DenoiserDeployment,
    TextEncoderDeployment,
    VaeDecoderDeployment,
    VaeEncoderDeployment,
)

GRPC_SERVICER_FUNCTIONS = [
    "sdserve.serve._ray.add_diffusion_service",
    "grpc_health.v1.health_pb2_grpc.add_HealthServicer_to_server",
]
"""What Serve's gRPC proxy must register (`grpc_options.grpc_servicer_functions`)."""


def build_app(config: SdserveConfig) -> Application:
    """Binds the six deployments with their per-stage placement from `config.stages`."""
    tree = config.model_dump()
    stages = config.stages
    text_encoder = TextEncoderDeployment.options(**stages.text_encoder.deployment_options()).bind(
        tree
    )
    denoiser = DenoiserDeployment.options(**stages.denoiser.deployment_options()).bind(tree)
    vae_decoder = VaeDecoderDeployment.options(**stages.vae_decoder.deployment_options()).bind(tree)
    vae_encoder = VaeEncoderDeployment.options(**stages.vae_encoder.deployment_options()).bind(tree)
    handles = (text_encoder, denoiser, vae_decoder, vae_encoder)
    job_worker = None
    if stages.job_worker.num_replicas or stages.job_worker.autoscaling:
        job_worker = JobWorkerDeployment.options(**stages.job_worker.deployment_options()).bind(
            *handles, tree
        )
    return PipelineIngress.options(**stages.ingress.deployment_options()).bind(
        *handles, job_worker, tree
    )


def app_builder(args: dict[str, Any]) -> Application:
    """Entry point for `serve run` / `serve deploy`: `args` is (part of) the config tree."""
    return build_app(SdserveConfig.model_validate(args or {}))
