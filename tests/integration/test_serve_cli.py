"""`sdserve serve` as a user runs it: foreground, healthy, then a clean stop on SIGTERM/SIGINT;
and the job queue across a restart of the whole process."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import grpc
import pytest
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc
from helpers import RedisServer, free_port, kill_session
from tls_certs import write_certs

from sdserve.v1 import diffusion_pb2, diffusion_pb2_grpc

pytestmark = pytest.mark.integration

QUICK = dict(prompt="a job", width=32, height=32, steps=2, guidance_scale=1.0, scheduler="ddim")


def _wait_for_line(proc: subprocess.Popen, text: str, timeout_s: float) -> list[str]:
    lines: list[str] = []
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            if proc.poll() is not None:
                break
            continue
        lines.append(line)
        if text in line:
            return lines
    raise AssertionError(f"{text!r} never printed; output:\n{''.join(lines[-40:])}")


def _start(tiny_model, tmp_path, grpc_port, *extra: str, http_port: int | None = None
           ) -> subprocess.Popen:  # fmt: skip
    """`sdserve serve` in its own session (so that a test can kill all of it), once serving."""
    exe = Path(sys.executable).with_name("sdserve")
    proc = subprocess.Popen(
        # eager: compiling the U-Net on start-up is tests/unit/test_compiled.py's subject
        [str(exe), "serve", "--model", str(tiny_model), "--grpc-port", str(grpc_port),
         "--http-port", str(http_port or free_port()), "--compile", "off", *extra],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )  # fmt: skip
    proc.lines = _wait_for_line(proc, f"serving DiffusionService on 127.0.0.1:{grpc_port}", 180)
    return proc


def _stop(proc: subprocess.Popen, sig: int) -> list[str]:
    """Stops it with `sig`; every line it printed."""
    proc.send_signal(sig)
    lines = _wait_for_line(proc, "sdserve stopped", 90)
    assert proc.wait(timeout=60) == 0, "".join(lines[-20:])
    return proc.lines + lines


def _config(tmp_path, **jobs) -> str:
    path = tmp_path / "sdserve.yaml"
    from sdserve.config import StagesConfig

    stages = StagesConfig().model_dump()  # the defaults, with one torch thread per stage:
    for stage in ("text_encoder", "denoiser", "vae_decoder", "vae_encoder"):
        stages[stage]["torch_threads"] = 1  # what `auto` measures on 2 cores, not measured
    for name, options in jobs.pop("stages", {}).items():
        stages[name].update(options)
    path.write_text(yaml.safe_dump({"jobs": jobs, "stages": stages}))
    return str(path)


def _queue_readers(redis_url: str, stream: str = "sdserve:queue:normal") -> dict:
    """Who reads a job queue stream: its consumer group's consumers and the entries delivered to
    them and not yet acknowledged (pending), with the stream's length."""
    from redis import Redis

    with Redis.from_url(redis_url) as client:
        (group,) = client.xinfo_groups(stream)
        return {"consumers": group["consumers"], "pending": group["pending"],
                "entries": client.xlen(stream)}  # fmt: skip


def _self_signed(tmp_path) -> tuple[Path, Path]:
    """A key and a self-signed certificate for 127.0.0.1 (openssl, as an operator makes one)."""
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-keyout", str(key), "-out", str(cert), "-subj", "/CN=127.0.0.1",
                    "-addext", "subjectAltName=IP:127.0.0.1"],
                   check=True, capture_output=True)  # fmt: skip
    return key, cert


def test_api_only_server_full_queue_redis_down_and_sigint(tiny_model, tiny_loras, tmp_path):
    """No JobWorker here (stages.job_worker.num_replicas: 0) and a queue cap of 2: the third
    SubmitJob answers RESOURCE_EXHAUSTED and creates nothing. With Redis gone, Generate still
    serves and the job RPCs answer UNAVAILABLE saying how to start one. The HTTP API answers over
    HTTPS (--ssl-keyfile/--ssl-certfile); --lora-dir points the model at an adapter folder.
    Its gRPC API asks for mutual TLS (--tls-client-ca): a client without a certificate fails
    at the handshake. SIGINT stops it all."""
    import httpx

    redis = RedisServer(tmp_path / "redis").start()
    grpc_port, http_port = free_port(), free_port()
    key, cert = _self_signed(tmp_path)
    certs = write_certs(tmp_path / "tls")
    mutual = ("--tls-cert", str(certs.server_cert), "--tls-key", str(certs.server_key),
              "--tls-client-ca", str(certs.ca))  # fmt: skip
    config = _config(
        tmp_path,
        redis_url=redis.url,
        max_queue_length=2,
        stages={"job_worker": {"num_replicas": 0}},
    )
    lora_dir = tiny_loras["grain"].parent
    proc = _start(tiny_model, tmp_path, grpc_port, "--config", config, "--ssl-keyfile",
                  str(key), "--ssl-certfile", str(cert), "--lora-dir", str(lora_dir), *mutual,
                  http_port=http_port)  # fmt: skip
    try:
        https = httpx.get(f"https://127.0.0.1:{http_port}/healthz", verify=str(cert), timeout=30)
        assert https.status_code == 200 and https.json()["status"] == "ok"
        body = {"prompt": "x", "size": "32x32", "num_inference_steps": 2}
        reply = httpx.post(f"https://127.0.0.1:{http_port}/v1/images/generations", json=body,
                           verify=str(cert), timeout=60)  # fmt: skip
        assert reply.status_code == 200 and reply.json()["data"][0]["b64_json"]
        target = f"127.0.0.1:{grpc_port}"
        no_certificate = grpc.ssl_channel_credentials(certs.ca.read_bytes())
        check = health_pb2.HealthCheckRequest()
        with grpc.secure_channel(target, no_certificate) as channel:
            with pytest.raises(grpc.RpcError) as err:
                health_pb2_grpc.HealthStub(channel).Check(check, timeout=10)
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE  # the handshake failed
        client = grpc.ssl_channel_credentials(certs.ca.read_bytes(), certs.client_key.read_bytes(),
                                              certs.client_cert.read_bytes())  # fmt: skip
        with grpc.secure_channel(target, client) as channel:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(), timeout=30
            )
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
            stub = diffusion_pb2_grpc.DiffusionServiceStub(channel)
            listed = stub.ListLoras(diffusion_pb2.ListLorasRequest(), timeout=30)
            assert [f.name for f in listed.loras] == ["broken", "grain", "ink"]
            with_grain = diffusion_pb2.GenerateRequest(**QUICK)
            with_grain.loras.add(name="grain", scale=1.0)
            assert stub.Generate(with_grain, timeout=60).parameters.loras[0].name == "grain"
            submit = diffusion_pb2.SubmitJobRequest(request=diffusion_pb2.GenerateRequest(**QUICK))
            ids = [stub.SubmitJob(submit, timeout=30).job_id for _ in range(2)]
            with pytest.raises(grpc.RpcError) as err:
                stub.SubmitJob(submit, timeout=30)
            assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "max_queue_length = 2" in err.value.details()
            # No worker: nothing reads the queue (its consumer group has no consumer, which a
            # worker becomes at its first claim, as its replica starts) and nothing took a job.
            assert _queue_readers(redis.url) == {"consumers": 0, "pending": 0, "entries": 2}
            for job_id in ids:
                job = stub.GetJob(diffusion_pb2.GetJobRequest(job_id=job_id), timeout=30)
                assert job.state == diffusion_pb2.JOB_STATE_QUEUED

            redis.stop()
            assert stub.Generate(diffusion_pb2.GenerateRequest(**QUICK), timeout=60).images
            with pytest.raises(grpc.RpcError) as err:
                stub.SubmitJob(submit, timeout=30)
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE
            assert "redis-server" in err.value.details() and redis.url in err.value.details()
        lines = _stop(proc, signal.SIGINT)
    finally:
        if proc.poll() is None:
            kill_session(proc.pid)
        redis.stop()
    _assert_stopped(grpc_port)
    # What a request did is in the log; the internal traffic (the ingress polls the Denoiser's
    # load every 0.2 s, health probes every stage) is not.
    assert sum("done in" in line for line in lines) >= 3, "".join(lines[-40:])
    internal = [line for line in lines if "CALL Stats" in line or "CALL Info" in line]
    assert internal == [], internal[:5]


def test_jobs_survive_a_restart_of_the_whole_server(tiny_model, tmp_path, redis_server):
    """SIGKILL sdserve and all of its Ray processes with jobs running and queued; start it
    again: every job completes, the interrupted ones at their second attempt."""
    config = _config(
        tmp_path,
        redis_url=redis_server.url,
        key_prefix=f"restart{uuid.uuid4().hex[:6]}:",
        lease_s=2.0,
        concurrency=2,
    )
    grpc_port = free_port()
    target = f"127.0.0.1:{grpc_port}"
    proc = _start(tiny_model, tmp_path, grpc_port, "--config", config)
    try:
        with grpc.insecure_channel(target) as channel:
            stub = diffusion_pb2_grpc.DiffusionServiceStub(channel)
            long = diffusion_pb2.GenerateRequest(**{**QUICK, "steps": 100, "width": 64})
            ids = [
                stub.SubmitJob(diffusion_pb2.SubmitJobRequest(request=long), timeout=30).job_id
                for _ in range(5)
            ]
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                jobs = [stub.GetJob(diffusion_pb2.GetJobRequest(job_id=j), timeout=30)
                        for j in ids]  # fmt: skip
                running = [j for j in jobs if j.state == diffusion_pb2.JOB_STATE_RUNNING]
                if len(running) == 2 and all(j.step >= 1 for j in running):
                    break
                time.sleep(0.05)
            else:
                raise AssertionError(f"jobs never ran: {jobs}")
        kill_session(proc.pid)
        proc.wait(timeout=30)

        proc = _start(tiny_model, tmp_path, grpc_port, "--config", config)
        with grpc.insecure_channel(target) as channel:
            stub = diffusion_pb2_grpc.DiffusionServiceStub(channel)
            deadline = time.monotonic() + 180
            while time.monotonic() < deadline:
                jobs = [stub.GetJob(diffusion_pb2.GetJobRequest(job_id=j), timeout=30)
                        for j in ids]  # fmt: skip
                if all(j.state == diffusion_pb2.JOB_STATE_SUCCEEDED for j in jobs):
                    break
                assert not any(j.state == diffusion_pb2.JOB_STATE_FAILED for j in jobs), jobs
                time.sleep(0.2)
            else:
                raise AssertionError(f"jobs did not complete after the restart: {jobs}")
        attempts = sorted(j.attempts for j in jobs)
        interrupted = {j.job_id for j in running}
        assert all(j.attempts == 2 for j in jobs if j.job_id in interrupted), jobs
        assert attempts.count(1) == 3, attempts

        # Graceful drain: SIGTERM to the whole process group (what systemd's default
        # KillMode=control-group and several supervisors send: Ray's processes get it too),
        # with a GenerateStream and two jobs running, one job queued.
        with grpc.insecure_channel(target) as channel:
            stub = diffusion_pb2_grpc.DiffusionServiceStub(channel)
            ids = [stub.SubmitJob(diffusion_pb2.SubmitJobRequest(request=long),
                                  timeout=30).job_id for _ in range(3)]  # fmt: skip
            stream = stub.GenerateStream(long, timeout=120)
            events = iter(stream)
            while next(events).WhichOneof("event") != "progress":
                pass
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                states = [stub.GetJob(diffusion_pb2.GetJobRequest(job_id=j), timeout=30).state
                          for j in ids]  # fmt: skip
                if states.count(diffusion_pb2.JOB_STATE_RUNNING) == 2:
                    break
                time.sleep(0.05)
            assert states.count(diffusion_pb2.JOB_STATE_QUEUED) == 1, states
            signalled = time.monotonic()
            os.killpg(proc.pid, signal.SIGTERM)
            last = [e for e in events][-1]  # the stream goes on to its result
            assert last.WhichOneof("event") == "result" and len(last.result.images) == 1
        lines = _wait_for_line(proc, "sdserve stopped", 120)
        assert proc.wait(timeout=60) == 0, "".join(lines[-20:])
        assert time.monotonic() - signalled < 30, "".join(lines[-20:])
        drained = asyncio.run(_records(redis_server.url, config, ids))
        assert sorted(r.state.value for r in drained) == ["QUEUED", "SUCCEEDED", "SUCCEEDED"]
        assert [r.attempts for r in drained if r.state.value == "QUEUED"] == [0]
    finally:
        if proc.poll() is None:
            kill_session(proc.pid)


async def _records(url: str, config_file: str, ids: list[str]):
    """The jobs as Redis holds them (the server is gone)."""
    from sdserve.jobs.queue import JobQueue

    prefix = yaml.safe_load(Path(config_file).read_text())["jobs"]["key_prefix"]
    queue = JobQueue(url, key_prefix=prefix)
    try:
        return [await queue.get(job_id) for job_id in ids]
    finally:
        await queue.close()


def _assert_stopped(grpc_port: int) -> None:
    with grpc.insecure_channel(f"127.0.0.1:{grpc_port}") as channel:
        with pytest.raises(grpc.RpcError) as err:
            health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=3)
        assert err.value.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
