"""Helpers shared by the tests (fixtures live in conftest.py)."""

from __future__ import annotations

import contextlib
import json
import socket
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent


EAGER = {"engine": {"compile": "off"}}
"""SdserveConfig keyword arguments for an eager U-Net: tests that are not about compilation
skip its start-up (tests/unit/test_compiled.py is about it)."""

API_KEYS = {"tenant-a": "test-key-a-5b1e9c", "tenant-b": "test-key-b-77d0f2"}
"""The integration server's API keys (tests/integration/conftest.py writes its key file)."""

WEBHOOK_SECRET = "whsec_c2RzZXJ2ZS10ZXN0LXdlYmhvb2stc2VjcmV0LTMy"
"""The integration server's webhook signing secret (its allow-list: 127.0.0.1)."""

FLOOD = {"tenant": "flood", "key": "test-key-flood-3c9d", "limits": {"rate_per_s": 1.0, "burst": 2}}
"""A third tenant of the integration server, limited as bench/bench_front_door.py expects."""

ADMIN = {"tenant": "ops", "key": "test-key-admin-e41a"}
"""The integration server's one key with the admin role (AdminService: test_admin_models.py)."""


def sdserve_cli(*args: str, timeout: float = 120, api_key: str | None = API_KEYS["tenant-a"]):
    """Runs the installed `sdserve` command (the console script beside this interpreter), with
    tenant A's API key in SDSERVE_API_KEY (servers without keys ignore it)."""
    import os
    import subprocess
    import sys

    exe = Path(sys.executable).with_name("sdserve")
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("SDSERVE_API_KEY", None)
    if api_key:
        env["SDSERVE_API_KEY"] = api_key
    return subprocess.run(
        [str(exe), *args], capture_output=True, text=True, timeout=timeout, env=env
    )


def with_metadata(channel, *pairs: tuple[str, str]):
    """The channel, with `pairs` added to the metadata of every call (an API key)."""
    import grpc

    class Add(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor):
        def _details(self, details):
            return details._replace(metadata=[*(details.metadata or ()), *pairs])

        def intercept_unary_unary(self, continuation, details, request):
            return continuation(self._details(details), request)

        def intercept_unary_stream(self, continuation, details, request):
            return continuation(self._details(details), request)

    return grpc.intercept_channel(channel, Add())


def denoiser_stats(app_name: str, deployment: str = "Denoiser"):
    """A Denoiser replica's engine counters (stages_pb2.DenoiserStats), from the driver (the
    default model's; "Denoiser-NAME" for another model's)."""
    from ray import serve

    from sdserve.v1 import stages_pb2

    handle = serve.get_deployment_handle(deployment, app_name=app_name)
    return stages_pb2.DenoiserStats.FromString(handle.Stats.remote(b"").result(timeout_s=30))


DASHBOARD = REPO_ROOT / "deploy" / "grafana" / "dashboards" / "sdserve.json"


def dashboard_metrics() -> set[str]:
    """Every metric name the Grafana dashboard's queries use."""
    import re

    dashboard = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for panel in dashboard["panels"] for t in panel["targets"]]
    return {name for e in exprs for name in re.findall(r"\b((?:sdserve|ray)_[a-z0-9_]+)\b", e)}


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now (sdserve.testing.ports)."""
    from sdserve.testing.ports import free_port

    return free_port()


def diffusers_image(
    pipe,
    model_dir: Path,
    scheduler: str,
    *,
    prompt,
    negative_prompt="",
    steps,
    guidance,
    width=None,
    height=None,
    seed,
    **inputs,
):
    """What diffusers makes for these inputs, as uint8 (h, w, 3). `pipe` may be any of the
    Stable Diffusion pipelines; `inputs` are its own (image, mask_image, strength).

    The scheduler is built the way diffusers users build one:
    `SchedulerClass.from_config(<the folder's scheduler config>)`.
    """
    import numpy as np
    import torch
    from diffusers import (
        DDIMScheduler,
        DDPMScheduler,
        DPMSolverMultistepScheduler,
        EulerAncestralDiscreteScheduler,
        EulerDiscreteScheduler,
        PNDMScheduler,
    )

    classes = {
        "ddpm": DDPMScheduler,
        "ddim": DDIMScheduler,
        "pndm": PNDMScheduler,
        "euler": EulerDiscreteScheduler,
        "euler_ancestral": EulerAncestralDiscreteScheduler,
        "dpmpp_2m": DPMSolverMultistepScheduler,
    }
    config = json.loads((model_dir / "scheduler" / "scheduler_config.json").read_text())
    pipe.scheduler = classes[scheduler].from_config(config)
    out = pipe(
        prompt,
        negative_prompt=negative_prompt or None,
        num_inference_steps=steps,
        guidance_scale=guidance,
        **({"width": width, "height": height} if width else {}),
        generator=torch.Generator("cpu").manual_seed(seed),
        output_type="np",
        **inputs,
    ).images[0]
    return (out * 255).round().astype(np.uint8)


def solo_latents(
    text,
    denoiser,
    *,
    prompt="a red circle",
    negative_prompt="",
    seeds=(0,),
    steps=6,
    guidance=7.5,
    scheduler="ddim",
    width=64,
    height=64,
):
    """One request through TextEncoder + Denoiser.denoise (no engine): the reference result."""
    emb = text.encode(prompt, negative_prompt, with_uncond=guidance > 1)
    return denoiser.denoise(
        emb.cond,
        emb.uncond,
        pooled=emb.pooled,
        uncond_pooled=emb.uncond_pooled,
        width=width,
        height=height,
        steps=steps,
        guidance_scale=guidance,
        scheduler=scheduler,
        seeds=list(seeds),
    )


@contextlib.asynccontextmanager
async def running_worker(worker):
    """Runs a job `Worker` in the background for the body of the `async with`, then stops it
    (cancelling it if it has not stopped within 5 s)."""
    import asyncio

    task = asyncio.create_task(worker.run_forever())
    try:
        yield worker
    finally:
        worker.stop()
        done, _ = await asyncio.wait({task}, timeout=5)
        if not done:
            task.cancel()
        await asyncio.gather(task, return_exceptions=True)


class RedisServer:
    """A real redis-server on a free port of 127.0.0.1, with its data in `dir`.

    `appendonly` (with fsync on every write) makes it keep its data across `restart()`, even
    after `kill()`: how production runs it for the job queue (docker-compose.yml does the same).
    """

    def __init__(
        self,
        dir: Path,
        *,
        appendonly: bool = True,
        password: str | None = None,
        tls: bool = False,
    ):
        self.dir = Path(dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.appendonly = appendonly
        self.password = password
        self.tls = tls
        self.proc = None

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        if self.tls:
            return f"rediss://{auth}127.0.0.1:{self.port}/0?ssl_ca_certs={self.dir / 'ca.crt'}"
        return f"redis://{auth}127.0.0.1:{self.port}/0"

    def _make_certificates(self) -> list[str]:
        """A CA and a certificate for 127.0.0.1 that it signed (openssl), as server flags."""
        import subprocess

        d = self.dir
        for args in (
            ["req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=test-ca",
             "-keyout", d / "ca.key", "-out", d / "ca.crt"],
            ["req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=127.0.0.1",
             "-keyout", d / "redis.key", "-out", d / "redis.csr"],
            ["x509", "-req", "-in", d / "redis.csr", "-CA", d / "ca.crt", "-CAkey", d / "ca.key",
             "-CAcreateserial", "-days", "2", "-out", d / "redis.crt",
             "-extfile", self._write(d / "san.ext", "subjectAltName=IP:127.0.0.1\n")],
        ):  # fmt: skip
            subprocess.run(["openssl", *map(str, args)], check=True, capture_output=True)
        return ["--port", "0", "--tls-port", str(self.port),
                "--tls-cert-file", str(d / "redis.crt"), "--tls-key-file", str(d / "redis.key"),
                "--tls-ca-cert-file", str(d / "ca.crt"), "--tls-auth-clients", "no"]  # fmt: skip

    @staticmethod
    def _write(path: Path, text: str) -> Path:
        path.write_text(text)
        return path

    def start(self, timeout_s: float = 10.0) -> RedisServer:
        import shutil
        import subprocess
        import time

        exe = shutil.which("redis-server")
        if exe is None:
            raise RuntimeError("redis-server is not installed (apt-get install redis-server)")
        args = [exe, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.dir),
                "--save", "", "--protected-mode", "no"]  # fmt: skip
        if self.tls:
            args += self._make_certificates()
        if self.appendonly:
            args += ["--appendonly", "yes", "--appendfsync", "always"]
        if self.password:
            args += ["--requirepass", self.password]
        with open(self.dir / "redis.log", "ab") as log:  # the child keeps its own copy
            self.proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as s:
                    if self.tls:  # accepting connections is all a plain socket can see
                        return self
                    s.sendall(b"PING\r\n")
                    if s.recv(64):  # +PONG, or -NOAUTH with a password: it is up either way
                        return self
            except OSError:
                time.sleep(0.05)
        raise RuntimeError(f"redis-server did not start on port {self.port}")

    def kill(self) -> None:
        """SIGKILL: what a crash or an OOM kill does."""
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            self.proc = None

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(timeout=10)
            self.proc = None

    def restart(self) -> None:
        self.kill()
        self.start()


def kill_session(sid: int) -> None:
    """SIGKILL every process of a session (sdserve.testing.processes)."""
    from sdserve.testing.processes import kill_session

    kill_session(sid)


def load_parts(model):
    """The float32 text encoder, denoiser and VAE decoder of `model`, for engine tests."""
    from sdserve.pipeline.denoise import Denoiser
    from sdserve.pipeline.text import TextEncoder
    from sdserve.pipeline.vae import VaeDecoder

    f32 = "float32"  # compared with diffusers in float32
    return (TextEncoder(model, dtype=f32), Denoiser(model, dtype=f32),
            VaeDecoder(model, dtype=f32))  # fmt: skip


class Recorder:
    """Collects a Denoiser engine job's events."""

    def __init__(self):
        self.events = []

    def __call__(self, event):
        self.events.append(event)

    @property
    def latents(self):
        from sdserve.pipeline.engine import Finished

        (done,) = [e for e in self.events if isinstance(e, Finished)]
        return done.latents


def engine_job(
    parts,
    request_id,
    *,
    prompt="a red circle",
    seeds=(0,),
    steps=6,
    guidance=7.5,
    scheduler="ddim",
    width=64,
    height=64,
    **kwargs,
):
    """A job of `parts` (`load_parts`) for the engine, and the recorder of its events."""
    text, denoiser, _ = parts
    emb = text.encode(prompt, "", with_uncond=guidance > 1)
    recorder = Recorder()
    job = denoiser.make_job(
        request_id,
        emb.cond,
        emb.uncond,
        pooled=emb.pooled,
        uncond_pooled=emb.uncond_pooled,
        width=width,
        height=height,
        steps=steps,
        guidance_scale=guidance,
        scheduler=scheduler,
        seeds=list(seeds),
        on_event=recorder,
        **kwargs,
    )
    return job, recorder


SAFETY_REQUEST = {"prompt": "a safety test", "seed": 40, "steps": 4, "num_images": 2,
                  "width": 64, "height": 64}  # fmt: skip
"""What tests/integration/test_safety_serving.py asks of the shared server's "default" model
(`safety: flag`) and its "sdxl" (`safety: block`): the session's checker flags each model's
first image (seed 40) and passes its second (seed 41) (`tuned_safety_checker`)."""


def tuned_safety_checker(folder: Path, models: dict[str, Path]) -> Path:
    """Writes a tiny safety checker into `folder` (`safety_checker/` + `feature_extractor/`),
    tuned on each model's own images of `SAFETY_REQUEST` (made in process, float32, as the
    server makes them): it flags the first image of each and passes the second."""
    import asyncio

    from sdserve.api.types import GenerateFields, Result
    from sdserve.config import SdserveConfig
    from sdserve.orchestration.in_process import InProcessStageClient
    from sdserve.orchestration.path import StagePath
    from sdserve.pipeline.images import open_rgb
    from sdserve.testing.safety_checkers import add_safety_checker, tune_safety_checker

    one = {"torch_threads": 1}
    config = SdserveConfig(
        models=[{"name": name, "path": str(path), "dtype": "float32"}
                for name, path in models.items()],
        stages={s: one for s in ("text_encoder", "denoiser", "vae_decoder", "vae_encoder")},
        **EAGER,
    )  # fmt: skip
    clients = InProcessStageClient.for_every_model(config)
    path = StagePath(clients, config)

    async def images(model: str) -> tuple[bytes, ...]:
        params = await path.validate(GenerateFields(**SAFETY_REQUEST, model=model))
        async for event in path.run(params):
            if isinstance(event, Result):
                return event.pngs
        raise AssertionError("no result")

    try:
        pngs = [asyncio.run(images(model)) for model in models]
    finally:
        for client in clients.values():
            client.denoiser.close()
        next(iter(clients.values())).denoiser.torch.close()
    add_safety_checker(folder)
    tune_safety_checker(folder, [open_rgb(p[0]) for p in pngs], [open_rgb(p[1]) for p in pngs])
    return folder
