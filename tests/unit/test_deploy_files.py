"""The scale-out files are valid for the tools that read them, and agree with each other:
docker-compose.yml against the Compose specification's JSON schema, the KubeRay RayService's
inline Serve config against Ray's ServeDeploySchema, and both against sdserve's config tree."""

from __future__ import annotations

import importlib.resources
import json

import jsonschema
import yaml
from helpers import REPO_ROOT

from sdserve.config import SdserveConfig

DEPLOY = REPO_ROOT / "deploy"


def _compose() -> dict:
    return yaml.safe_load((REPO_ROOT / "docker-compose.yml").read_text())


def test_compose_file_follows_the_compose_specification():
    # check-jsonschema vendors the schema published by the compose-spec project.
    text = importlib.resources.files("check_jsonschema.builtin_schemas.vendor").joinpath(
        "compose-spec.json"
    )
    schema = json.loads(text.read_text())
    validator = jsonschema.validators.validator_for(schema)(schema)
    errors = [f"{list(e.path)}: {e.message}" for e in validator.iter_errors(_compose())]
    assert errors == []


def test_compose_runs_the_whole_stack_with_gpu_workers():
    services = _compose()["services"]
    assert {"redis", "ray-head", "gpu-worker", "prometheus", "grafana"} <= services.keys()
    assert "--appendonly" in services["redis"]["command"]
    devices = services["gpu-worker"]["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["driver"] == "nvidia" and "gpu" in devices[0]["capabilities"]
    head = " ".join(services["ray-head"]["command"])
    worker = " ".join(services["gpu-worker"]["command"])
    assert "ray start --head" in head and "sdserve serve --address auto" in head
    assert '"cpu_node"' in head and '"gpu_node"' in worker
    assert (
        "./deploy/prometheus.yml:/etc/prometheus/prometheus.yml:ro"
        in (services["prometheus"]["volumes"])
    )
    assert any(v.startswith("./models:/models:ro") for v in services["ray-head"]["volumes"])
    assert all("healthcheck" in services[name] for name in ("redis", "ray-head"))

    # The config it runs places the Denoiser on the GPU workers, the rest on the head.
    config = SdserveConfig.model_validate(
        yaml.safe_load((DEPLOY / "compose-sdserve.yaml").read_text())
    )
    assert config.stages.denoiser.resources == {"gpu_node": 1}
    assert config.stages.denoiser.autoscaling is not None
    for name in ("ingress", "text_encoder", "vae_decoder", "vae_encoder", "job_worker"):
        assert getattr(config.stages, name).resources == {"cpu_node": 1}


def test_kuberay_rayservice_has_a_valid_inline_serve_config():
    from ray.serve.schema import ServeDeploySchema

    service = yaml.safe_load((DEPLOY / "kuberay" / "rayservice.yaml").read_text())
    assert service["apiVersion"] == "ray.io/v1" and service["kind"] == "RayService"
    raw = yaml.safe_load(service["spec"]["serveConfigV2"])
    (app,) = ServeDeploySchema.model_validate(raw).applications
    assert app.import_path == "sdserve.serve.app:app_builder"
    config = SdserveConfig.model_validate(app.args)
    # The gRPC port is the own front door's, on the pod the ingress replicas and the proxies
    # share; no Serve gRPC proxy claims it beside them.
    assert "grpc_options" not in raw and raw["proxy_location"] == "HeadOnly"
    assert config.server.front_door == "sdserve" and config.server.grpc_host == "0.0.0.0"
    assert config.stages.ingress.resources == {"cpu_node": 1}

    # Every custom resource a stage asks for is one some node group offers.
    cluster = service["spec"]["rayClusterConfig"]
    groups = [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]
    offered = set()
    for group in groups:
        resources = group["rayStartParams"].get("resources")
        if resources:
            offered |= json.loads(json.loads(resources)).keys()
    for name in ("ingress", "text_encoder", "denoiser", "vae_decoder", "vae_encoder", "job_worker"):
        assert getattr(config.stages, name).resources.keys() <= offered, name
    (gpu,) = cluster["workerGroupSpecs"]
    (container,) = gpu["template"]["spec"]["containers"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert config.stages.denoiser.autoscaling.max_replicas <= gpu["maxReplicas"]


def test_stage_options_reach_serve():
    """Autoscaling replaces num_replicas; placement and drain time are passed on."""
    stage = SdserveConfig.model_validate(
        {"stages": {"denoiser": {"num_gpus": 1, "resources": {"gpu_node": 1},
                                 "graceful_shutdown_timeout_s": 90,
                                 "autoscaling": {"min_replicas": 1, "max_replicas": 4}}}}
    ).stages.denoiser  # fmt: skip
    options = stage.deployment_options()
    assert "num_replicas" not in options
    assert options["autoscaling_config"]["max_replicas"] == 4
    assert options["ray_actor_options"]["resources"] == {"gpu_node": 1}
    assert options["ray_actor_options"]["num_gpus"] == 1
    assert options["graceful_shutdown_timeout_s"] == 90


def test_flux_serve_config_runs_t5_as_its_own_deployment(tiny_flux_model):
    """deploy/serve_config_flux.yaml is valid for Ray and sdserve; built on a tiny FLUX (the
    graph only: no Ray is started), it binds a TextEncoderT5 on its own GPU share and no
    VaeEncoder (FLUX takes no image inputs)."""
    import ray
    from ray.serve.schema import ServeDeploySchema

    from sdserve.serve import _ray
    from sdserve.serve.app import app_builder

    raw = yaml.safe_load((DEPLOY / "serve_config_flux.yaml").read_text())
    (app,) = ServeDeploySchema.model_validate(raw).applications
    assert app.import_path == "sdserve.serve.app:app_builder"
    config = SdserveConfig.model_validate(app.args)
    assert config.stages.text_encoder_t5 is not None and config.model.dtype == "bfloat16"

    args = {**app.args, "model": {**app.args["model"], "path": str(tiny_flux_model)}}
    deployments = _ray.app_deployments(app_builder(args))
    assert set(deployments) == {"Pipeline", "JobWorker", "TextEncoder", "TextEncoderT5",
                                "Denoiser", "VaeDecoder"}  # fmt: skip
    t5 = deployments["TextEncoderT5"].ray_actor_options
    assert t5["num_gpus"] == config.stages.text_encoder_t5.num_gpus > 0
    assert not ray.is_initialized()


def test_each_model_is_bound_the_deployments_of_its_family(tiny_sd3_model, tiny_flux_model):
    """A U-Net model keeps its four deployments; SD3 and FLUX have no VaeEncoder, and a
    TextEncoderT5 only where `text_encoder_t5` is set (here the SD3 model's own)."""
    from sdserve.config import ModelConfig, ModelStagesConfig, StageConfig
    from sdserve.serve import _ray
    from sdserve.serve.app import build_app

    t5 = ModelStagesConfig(text_encoder_t5=StageConfig(num_gpus=0.5))
    config = SdserveConfig(models=[
        ModelConfig(name="unet"),
        ModelConfig(name="sd3", path=str(tiny_sd3_model), stages=t5),
        ModelConfig(name="flux", path=str(tiny_flux_model)),
    ])  # fmt: skip
    deployments = _ray.app_deployments(build_app(config))
    assert set(deployments) == {
        "Pipeline", "JobWorker", "TextEncoder", "Denoiser", "VaeDecoder", "VaeEncoder",
        "TextEncoder-sd3", "TextEncoderT5-sd3", "Denoiser-sd3", "VaeDecoder-sd3",
        "TextEncoder-flux", "Denoiser-flux", "VaeDecoder-flux",
    }  # fmt: skip
    assert deployments["TextEncoderT5-sd3"].ray_actor_options["num_gpus"] == 0.5
    handles = deployments["Pipeline"].init_args[0]  # {model: StageHandles}, Serve's handles
    assert list(handles) == ["unet", "sd3", "flux"]
    assert handles["unet"].vae_encoder is not None and handles["unet"].text_encoder_t5 is None
    assert handles["sd3"].vae_encoder is None and handles["sd3"].text_encoder_t5 is not None
    assert handles["flux"].vae_encoder is None and handles["flux"].text_encoder_t5 is None
