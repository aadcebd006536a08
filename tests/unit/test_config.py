"""The config tree, and deploy/serve_config.yaml against Ray's own schema."""

import pydantic
import pytest
import yaml
from helpers import REPO_ROOT

from sdserve.config import SdserveConfig, load_config


def test_defaults():
    config = SdserveConfig()
    assert config.server.grpc_port == 9000
    assert config.limits.max_steps == 150
    assert config.stages.denoiser.ray_actor_options() == {"num_cpus": 1.0, "num_gpus": 0.0}


def test_file_env_and_flags_in_order_of_precedence(tmp_path):
    file = tmp_path / "c.yaml"
    file.write_text("server: {grpc_port: 9100}\nlimits: {max_steps: 50}\n")
    assert load_config(file, environ={}).server.grpc_port == 9100
    env = {"SDSERVE_GRPC_PORT": "9200"}
    assert load_config(file, environ=env).server.grpc_port == 9200
    config = load_config(file, {("server", "grpc_port"): 9300, ("model", "path"): None}, env)
    assert config.server.grpc_port == 9300
    assert config.limits.max_steps == 50
    assert config.model.path is None


@pytest.mark.parametrize(
    "text",
    [
        "server: {grpc_prot: 1}",
        "limits: {max_steps: 0}",
        "defaults: {scheduler: lms}",
        "defaults: {steps: 200}",
    ],
)
def test_invalid_config_is_rejected(tmp_path, text):
    file = tmp_path / "c.yaml"
    file.write_text(text)
    with pytest.raises(pydantic.ValidationError):
        load_config(file, environ={})


def test_serve_config_is_valid_for_ray_and_for_sdserve():
    from ray.serve.schema import ServeDeploySchema

    raw = yaml.safe_load((REPO_ROOT / "deploy" / "serve_config.yaml").read_text())
    schema = (
        ServeDeploySchema.model_validate(raw)
        if hasattr(ServeDeploySchema, "model_validate")
        else ServeDeploySchema.parse_obj(raw)
    )
    (app,) = schema.applications
    assert app.import_path == "sdserve.serve.app:app_builder"
    config = SdserveConfig.model_validate(app.args)
    assert config.stages.denoiser.num_replicas >= 1
    # The gRPC port is the own front door's: no Serve gRPC proxy claims it beside it.
    assert "grpc_options" not in raw
    assert config.server.front_door == "sdserve" and config.server.grpc_port == 9000


def test_example_config_file_is_valid_and_matches_the_defaults():
    config = load_config(REPO_ROOT / "deploy" / "sdserve.yaml", environ={})
    assert config == SdserveConfig()


def test_a_busy_metrics_port_falls_back_to_a_free_one():
    import socket

    from sdserve.serve.server import metrics_port

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        taken = busy.getsockname()[1]
        other = metrics_port(taken)
        assert other != taken
    assert metrics_port(other) == other  # free again: kept as asked


def test_several_models_each_with_their_own_stage_settings():
    config = SdserveConfig.model_validate({
        "models": [
            {"name": "sd15", "path": "/models/sd15"},
            {"name": "xl", "path": "/models/xl", "scheduler": "euler",
             "stages": {"denoiser": {"num_gpus": 1, "num_replicas": 3}}},
        ],
    })  # fmt: skip
    assert [m.name for m in config.served_models] == ["sd15", "xl"]
    assert config.model_named().name == "sd15"  # the first is the default
    xl = config.model_named("xl")
    assert config.stage("denoiser", xl).deployment_options()["num_replicas"] == 3
    assert config.stage("denoiser", config.model_named("sd15")) == config.stages.denoiser
    assert config.stage("vae_decoder", xl) == config.stages.vae_decoder
    # The tree every replica gets validates again to the same config.
    assert SdserveConfig.model_validate(config.model_dump()) == config
    assert SdserveConfig().served_models == (SdserveConfig().model,)


@pytest.mark.parametrize(
    ("tree", "message"),
    [
        ({"models": [{"name": "a"}, {"name": "a"}]}, "names must be unique"),
        ({"model": {"path": "/x"}, "models": [{"name": "a"}]}, "not both"),
        ({"models": [{"name": "no spaces"}]}, "pattern"),
    ],
)
def test_bad_model_lists_are_rejected(tree, message):
    with pytest.raises(pydantic.ValidationError, match=message):
        SdserveConfig.model_validate(tree)


def test_serve_model_flags(tmp_path):
    from sdserve.cli.serve import _named, parse_model

    assert parse_model("/m/sd15") == {"name": None, "path": "/m/sd15"}
    assert parse_model("xl=/m/sdxl") == {"name": "xl", "path": "/m/sdxl"}
    assert parse_model("shapes=default") == {"name": "shapes", "path": None}
    assert _named({"name": None, "path": str(tmp_path / "sd21")})["name"] == "sd21"


def test_serve_lora_dir_flags(tmp_path):
    from sdserve.cli.serve import with_lora_dirs

    one, two = tmp_path / "one", tmp_path / "two"
    one.mkdir(), two.mkdir()
    config = with_lora_dirs(SdserveConfig(), [str(one)])
    assert config.model.lora_dir == str(one) and not config.models
    several = SdserveConfig.model_validate({"models": [{"name": "a"}, {"name": "b"}]})
    config = with_lora_dirs(several, [str(one), f"b={two}"])
    assert [m.lora_dir for m in config.models] == [str(one), str(two)]
    with pytest.raises(SystemExit, match="no served model 'c'"):
        with_lora_dirs(several, [f"c={two}"])
    with pytest.raises(SystemExit, match="is not a folder"):
        with_lora_dirs(several, [str(tmp_path / "nope")])


def test_serve_dtype_flag_sets_every_served_model():
    from sdserve.cli.serve import with_dtype

    assert with_dtype(SdserveConfig(), None) == SdserveConfig()
    assert with_dtype(SdserveConfig(), "float32").model.dtype == "float32"
    several = SdserveConfig.model_validate({"models": [{"name": "a"}, {"name": "b"}]})
    assert [m.dtype for m in with_dtype(several, "bfloat16").models] == ["bfloat16"] * 2


def test_engine_compile_settings_are_checked():
    engine = SdserveConfig().engine
    assert (engine.compile, engine.compile_shapes, engine.batch_invariant) == (
        "auto",
        "auto",
        False,
    )
    for bad in ({"compile": "fast"}, {"compile_buckets": [0, 4]}, {"compile_sizes": [[60, 64]]},
                {"compile_shapes": "static"}):  # fmt: skip
        with pytest.raises(ValueError):
            SdserveConfig.model_validate({"engine": bad})
