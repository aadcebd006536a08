"""Each model's stage deployments, bound: for the main application (`sdserve.serve.app`) and
for the applications of models added at runtime (`sdserve.serve.admin`), one per model.

An added model is an application of its own, so that deploying or deleting it leaves every
other application's replicas as they are (Serve redeploys an application as a whole). Its
stage deployments are named as a non-default model's ("Denoiser-NAME", ...) under a small
ingress, `ModelApp`, that Serve needs an application to have; the Pipeline and JobWorker
replicas call the stages through handles they take by name (`model_stage_handles`).
"""

from __future__ import annotations

from ray import serve
from ray.serve import Application

from sdserve.config import ModelConfig, SdserveConfig
from sdserve.serve.client import StageHandles
from sdserve.serve.stages import (
    DenoiserDeployment,
    SafetyCheckerDeployment,
    TextEncoderDeployment,
    TextEncoderT5Deployment,
    VaeDecoderDeployment,
    VaeEncoderDeployment,
)
from sdserve.stages.runtime import model_stages

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


def deployment_name(stage: str, model: str, default: bool) -> str:
    """A stage deployment's name: "Denoiser" for the default model (so a one-model server's
    names, dashboards and deploy files do not change), "Denoiser-NAME" for the others."""
    base = STAGE_DEPLOYMENTS[stage].func_or_class.__name__.removesuffix("Deployment")
    return base if default else f"{base}-{model}"


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


def build_model_app(config: SdserveConfig, model: ModelConfig) -> Application:
    """The application of a model added at runtime: its stage deployments under `ModelApp`.
    `config` must serve `model` (its stages read their settings from the tree by name)."""
    stages = bind_model_stages(config, model, default=False)
    return ModelAppDeployment.options(name=f"Model-{model.name}").bind(stages)


@serve.deployment(name="ModelApp", num_replicas=1, ray_actor_options={"num_cpus": 0})
class ModelAppDeployment:
    """The ingress of an added model's application: holds its stage deployments (so that Serve
    deploys them with it) and answers nothing else."""

    def __init__(self, stages: StageHandles):
        self.stages = stages

    def Ping(self, request: bytes = b"") -> bytes:
        return b"ok"


def model_app_name(app_name: str, model: str) -> str:
    """The Serve application of the model `model` added to the application `app_name`."""
    return f"{app_name}.{model}"


def model_stage_handles(config: SdserveConfig, model: ModelConfig) -> StageHandles:
    """Handles to the stage deployments of an added model's application, taken by name."""
    app = model_app_name(config.server.app_name, model.name)
    handles = {
        stage: serve.get_deployment_handle(deployment_name(stage, model.name, False), app)
        for stage in model_stages(config, model)
    }
    return StageHandles(**handles)
