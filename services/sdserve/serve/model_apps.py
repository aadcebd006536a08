"""Names and handles of each model's stage deployments, without importing them.

The Pipeline and JobWorker replicas use this to call the stages of a model added at runtime
(`sdserve.serve.admin`): an application of its own, `APP.NAME`, whose stage deployments are
named as a non-default model's ("Denoiser-NAME", ...). They take handles by name, from the
deployments Serve runs in that application, so they never import the deployment classes
(which import torch, transformers and diffusers: the ingress starts without them). The
classes and the binding live in `sdserve.serve.app`.
"""

from __future__ import annotations

from ray import serve

from sdserve.serve.client import StageHandles

STAGE_NAMES = {
    "text_encoder": "TextEncoder",
    "denoiser": "Denoiser",
    "vae_decoder": "VaeDecoder",
    "vae_encoder": "VaeEncoder",
    "text_encoder_t5": "TextEncoderT5",
    "safety_checker": "SafetyChecker",
}
"""Each stage's deployment name, by its name in `config.stages` and `StageHandles`
(`sdserve.serve.app.STAGE_DEPLOYMENTS` holds the classes; a test keeps the two alike)."""


def deployment_name(stage: str, model: str, default: bool) -> str:
    """A stage deployment's name: "Denoiser" for the default model (so a one-model server's
    names, dashboards and deploy files do not change), "Denoiser-NAME" for the others."""
    return STAGE_NAMES[stage] if default else f"{STAGE_NAMES[stage]}-{model}"


def model_app_name(app_name: str, model: str) -> str:
    """The Serve application of the model `model` added to the application `app_name`."""
    return f"{app_name}.{model}"


def model_stage_handles(app_name: str, model: str) -> StageHandles:
    """Handles to the stage deployments of the added model `model` (its application must be
    running), taken by name from what Serve runs there."""
    app = model_app_name(app_name, model)
    status = serve.status().applications.get(app)
    running = set(status.deployments) if status is not None else set()
    handles = {
        stage: serve.get_deployment_handle(deployment_name(stage, model, False), app)
        for stage in STAGE_NAMES
        if deployment_name(stage, model, False) in running
    }
    missing = {"text_encoder", "denoiser", "vae_decoder"} - set(handles)
    if missing:
        raise LookupError(f"application {app} runs no {', '.join(sorted(missing))}")
    return StageHandles(**handles)
