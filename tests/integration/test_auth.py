"""API keys and tenants on the session's server (its key file has tenants A and B)."""

from __future__ import annotations

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from helpers import API_KEYS, sdserve_cli, with_metadata

from sdserve.v1 import diffusion_pb2, diffusion_pb2_grpc

pytestmark = pytest.mark.integration

QUICK = dict(prompt="a key", width=32, height=32, steps=2, guidance_scale=1.0, scheduler="ddim")


def _stub(raw_channel, key=None):
    channel = raw_channel if key is None else with_metadata(
        raw_channel, ("authorization", f"Bearer {key}"))  # fmt: skip
    return diffusion_pb2_grpc.DiffusionServiceStub(channel)


def test_without_a_key_every_rpc_is_unauthenticated_and_health_stays_open(raw_channel):
    stub = _stub(raw_channel)
    calls = [
        lambda: stub.Generate(diffusion_pb2.GenerateRequest(**QUICK), timeout=30),
        lambda: list(stub.GenerateStream(diffusion_pb2.GenerateRequest(**QUICK), timeout=30)),
        lambda: stub.SubmitJob(
            diffusion_pb2.SubmitJobRequest(request=diffusion_pb2.GenerateRequest(**QUICK)),
            timeout=30,
        ),  # fmt: skip
        lambda: stub.GetJob(diffusion_pb2.GetJobRequest(job_id="x"), timeout=30),
        lambda: stub.CancelJob(diffusion_pb2.GetJobRequest(job_id="x"), timeout=30),
    ]
    for call in calls:
        with pytest.raises(grpc.RpcError) as err:
            call()
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert "authorization: Bearer KEY" in err.value.details()
    with pytest.raises(grpc.RpcError) as err:
        _stub(raw_channel, "not-a-key").Generate(diffusion_pb2.GenerateRequest(**QUICK), timeout=30)
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "not-a-key" not in err.value.details()
    reply = health_pb2_grpc.HealthStub(raw_channel).Check(health_pb2.HealthCheckRequest(),
                                                           timeout=30)  # fmt: skip
    assert reply.status == health_pb2.HealthCheckResponse.SERVING


def test_a_tenant_sees_and_cancels_only_its_own_jobs(raw_channel):
    a, b = _stub(raw_channel, API_KEYS["tenant-a"]), _stub(raw_channel, API_KEYS["tenant-b"])
    long = diffusion_pb2.GenerateRequest(**{**QUICK, "steps": 150, "width": 64, "height": 64})
    submit = diffusion_pb2.SubmitJobRequest(request=long, idempotency_key="shared-key")
    job_id = a.SubmitJob(submit, timeout=30).job_id
    ask = diffusion_pb2.GetJobRequest(job_id=job_id)
    for call in (b.GetJob, b.CancelJob, lambda r, timeout: list(b.WatchJob(r, timeout=timeout))):
        with pytest.raises(grpc.RpcError) as err:
            call(ask, timeout=30)
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
        assert err.value.details().startswith("job_id: no job")
    assert not a.GetJob(ask, timeout=30).cancel_requested  # B's cancel did nothing
    # Idempotency keys are per tenant: B's "shared-key" is a job of its own.
    other = b.SubmitJob(submit, timeout=30)
    assert other.created and other.job_id != job_id
    for stub, job in ((a, job_id), (b, other.job_id)):
        cancelled = stub.CancelJob(diffusion_pb2.GetJobRequest(job_id=job), timeout=30)
        assert cancelled.cancel_requested or cancelled.state == diffusion_pb2.JOB_STATE_CANCELLED


def test_the_cli_sends_the_key_from_the_environment(server, tmp_path):
    out = tmp_path / "x.png"
    opts = ["--server", server.target, "--steps", "2", "--width", "32", "--height", "32", "-q"]
    denied = sdserve_cli("generate", "a key", *opts, "-o", str(out), api_key=None)
    assert denied.returncode == 2 and denied.stderr.startswith("UNAUTHENTICATED: ")
    allowed = sdserve_cli("generate", "a key", *opts, "-o", str(out), api_key=API_KEYS["tenant-b"])
    assert allowed.returncode == 0, allowed.stderr
    assert out.read_bytes().startswith(b"\x89PNG")
