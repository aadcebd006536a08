"""One Ray instance and one sdserve application for the whole integration session."""

from __future__ import annotations

from dataclasses import dataclass

import grpc
import pytest
from helpers import (
    ADMIN,
    API_KEYS,
    FLOOD,
    WEBHOOK_SECRET,
    free_port,
    tuned_safety_checker,
    with_metadata,
)
from tls_certs import Certs, write_certs

from sdserve.config import (
    EngineConfig,
    JobsConfig,
    MetricsConfig,
    ModelConfig,
    ModelStagesConfig,
    SdserveConfig,
    ServerConfig,
    StageConfig,
    StagesConfig,
    WebhooksConfig,
)


@dataclass
class Server:
    target: str
    config: SdserveConfig
    certs: Certs
    """The session server speaks TLS: `certs.ca` signed its certificate."""


SERVED_MODELS = ("default", "shapes", "sdxl", "sd3", "flux")
"""The shared server's models, the default first: the tiny model (called "default", so that
one-model tests see a one-model server's names), the built-in default model, a tiny SDXL, a
tiny SD3 (its T5 a deployment of its own) and a tiny FLUX (T5 in its TextEncoder)."""


@pytest.fixture(scope="session")
def certs(tmp_path_factory) -> Certs:
    return write_certs(tmp_path_factory.mktemp("tls"))


@pytest.fixture(scope="session", autouse=True)
def trust_the_test_ca(certs):
    """The CLI and the Python client take the CA from $SDSERVE_TLS_CA, as a user's would
    (session-wide, for module-scoped clients too; the integration tests run last)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("SDSERVE_TLS_CA", str(certs.ca))
        yield


@pytest.fixture(scope="session")
def safety_checker_dir(tiny_model, tiny_sdxl_model, tmp_path_factory):
    """The tiny safety checker of the "default" and "sdxl" models, tuned on their own images
    (`helpers.SAFETY_REQUEST`; about a second)."""
    models = {"default": tiny_model, "sdxl": tiny_sdxl_model}
    return tuned_safety_checker(tmp_path_factory.mktemp("safety"), models)


@pytest.fixture(scope="session")
def server(tiny_model, tiny_loras, tiny_controlnets, tiny_sdxl_model, tiny_sd3_model,
           tiny_flux_model, tmp_path_factory, redis_server, certs,
           safety_checker_dir):  # fmt: skip
    """sdserve on the tiny model (the default), the built-in model, a tiny SDXL, SD3 and FLUX,
    on free ports of 127.0.0.1 (Ray's GCS port is free too), with its job queue on the
    session's own redis-server and two JobWorker replicas. Its gRPC front door speaks TLS.
    The default model's safety checker flags images, the SDXL's blocks them (each one more
    replica; test_safety_serving.py)."""
    from sdserve.serve import server as sdserve_server

    keys = tmp_path_factory.mktemp("auth") / "api-keys.txt"
    keys.write_text("".join(f"{key} {tenant}\n" for tenant, key in API_KEYS.items())
                    + f"{FLOOD['key']} {FLOOD['tenant']}\n"
                    + f"{ADMIN['key']} {ADMIN['tenant']} admin\n")  # fmt: skip
    paths = (str(tiny_model), None, str(tiny_sdxl_model), str(tiny_sd3_model),
             str(tiny_flux_model))  # fmt: skip
    loras = str(tiny_loras["grain"].parent)  # the default model's adapters
    # The default model's Denoiser reserves a CPU (the shared default); the others reserve
    # none, so that all five fit on a 2-core machine (each model's own stage settings). The
    # SD3 model's T5 runs in a TextEncoderT5 deployment of its own, also without a CPU.
    denoiser = StageConfig(num_cpus=0, max_ongoing_requests=4096, torch_threads=1)
    no_cpu = ModelStagesConfig(denoiser=denoiser)
    t5_apart = ModelStagesConfig(
        denoiser=denoiser, text_encoder_t5=StageConfig(num_cpus=0, torch_threads=1)
    )
    # One torch thread per stage, what `auto` measures on 2 cores anyway, without measuring it
    # in each of the 20 stage replicas at start-up (tests/unit/test_threads.py measures it).
    defaults = StagesConfig()
    stages = ("text_encoder", "denoiser", "vae_decoder", "vae_encoder", "safety_checker")
    one_thread = {stage: getattr(defaults, stage).model_copy(update={"torch_threads": 1})
                  for stage in stages}  # fmt: skip
    # The tiny models compute in float32, as the diffusers their images are compared with; the
    # built-in model in this machine's default dtype (auto). Every U-Net runs eagerly: the
    # compiled path is tests/unit/test_compiled.py's, and compiling would add minutes here.
    checker = str(safety_checker_dir)
    own = ({"lora_dir": loras, "controlnet_dir": str(tiny_controlnets), "dtype": "float32",
            "safety": "flag", "safety_checker_dir": checker},
           {"stages": no_cpu},
           {"stages": no_cpu, "dtype": "float32", "safety": "block",
            "safety_checker_dir": checker},
           {"stages": t5_apart, "dtype": "float32"},
           {"stages": no_cpu, "dtype": "float32"})  # fmt: skip
    config = SdserveConfig(
        models=[
            ModelConfig(name=name, path=path, **own[i])
            for i, (name, path) in enumerate(zip(SERVED_MODELS, paths, strict=True))
        ],
        engine=EngineConfig(compile="off"),
        server=ServerConfig(
            grpc_port=free_port(),
            http_port=free_port(),
            api_key_file=str(keys),
            tls_cert=str(certs.server_cert),
            tls_key=str(certs.server_key),
            # Serve's gRPC proxy beside the front door: test_front_door_bench.py compares them
            serve_proxy_port=free_port(),
        ),
        tenants={FLOOD["tenant"]: FLOOD["limits"]},
        stages=StagesConfig(job_worker=StageConfig(num_replicas=2), **one_thread),
        # A short lease, so that taking over a killed worker's job is quick; every step
        # recorded, so that tests can catch a job mid-way (the 0.25 s default is unit-tested).
        jobs=JobsConfig(
            redis_url=redis_server.url, lease_s=2.0, concurrency=4, progress_interval_s=0.0
        ),
        # Replicas push their metrics every second, so that the Prometheus test is quick.
        metrics=MetricsConfig(export_port=free_port(), report_interval_s=1.0),
        # Webhooks to the tests' own receivers, retried quickly (test_job_webhooks.py).
        webhooks=WebhooksConfig(
            allow=("127.0.0.1",),
            secret=WEBHOOK_SECRET,
            backoff_s=0.2,
            backoff_cap_s=0.5,
            poll_s=0.1,
        ),  # fmt: skip
    )
    sdserve_server.start_ray(config)
    try:
        sdserve_server.deploy(config)
        target = f"127.0.0.1:{config.server.grpc_port}"
        # 20 stage deployments (SDXL, SD3 and FLUX have no VaeEncoder; the default model and
        # SDXL a SafetyChecker), the ingress and 2 JobWorker replicas: 23 replicas on 2 cores
        sdserve_server.wait_serving(config, timeout_s=420)
        yield Server(target=target, config=config, certs=certs)
    finally:
        import ray

        ray.shutdown()  # the whole local cluster at once: no graceful stop of each replica


@pytest.fixture(scope="session")
def raw_channel(server):
    """A TLS channel that sends no API key."""
    credentials = grpc.ssl_channel_credentials(server.certs.ca.read_bytes())
    with grpc.secure_channel(server.target, credentials) as ch:
        yield ch


@pytest.fixture(scope="session")
def channel(raw_channel):
    """A channel whose calls carry tenant A's API key."""
    return with_metadata(raw_channel, ("authorization", f"Bearer {API_KEYS['tenant-a']}"))


@pytest.fixture(scope="session")
def stub(channel):
    from sdserve.v1 import diffusion_pb2_grpc

    return diffusion_pb2_grpc.DiffusionServiceStub(channel)
