"""`sdserve serve` as a user runs it: foreground, healthy, then a clean stop on SIGTERM."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from helpers import free_port

pytestmark = pytest.mark.integration


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


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_serve_runs_in_foreground_and_stops_cleanly(tiny_model, tmp_path, sig):
    grpc_port = free_port()
    exe = Path(sys.executable).with_name("sdserve")
    proc = subprocess.Popen(
        [str(exe), "serve", "--model", str(tiny_model), "--grpc-port", str(grpc_port),
         "--http-port", str(free_port())],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1", "SDSERVE_CACHE_DIR": str(tmp_path)},
    )  # fmt: skip
    try:
        _wait_for_line(proc, f"serving DiffusionService on 127.0.0.1:{grpc_port}", 180)
        with grpc.insecure_channel(f"127.0.0.1:{grpc_port}") as channel:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(), timeout=30
            )
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
        proc.send_signal(sig)
        lines = _wait_for_line(proc, "sdserve stopped", 90)
        assert proc.wait(timeout=60) == 0, "".join(lines[-20:])
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    with grpc.insecure_channel(f"127.0.0.1:{grpc_port}") as channel:
        with pytest.raises(grpc.RpcError) as err:
            health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=3)
        assert err.value.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
