"""The chaos test's server: `sdserve serve` on the tiny model, started as a user starts it, in its
own session (so that the test can find its replicas' processes and kill all of it at the end)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from helpers import free_port, kill_session


@dataclass
class ChaosServer:
    target: str  # 127.0.0.1:PORT of the gRPC API
    proc: subprocess.Popen  # `sdserve serve`; its pid is its session's id
    log: Path  # everything it and its replicas printed

    def tail(self, lines: int = 60) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])


def _wait_for_text(server: ChaosServer, text: str, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while text not in server.log.read_text(errors="replace"):
        if server.proc.poll() is not None or time.monotonic() > deadline:
            raise AssertionError(f"{text!r} never printed; the log ends:\n{server.tail()}")
        time.sleep(0.5)


@pytest.fixture
def chaos_server(tiny_model, redis_server, tmp_path):
    """`sdserve serve --model TINY ...` with the job queue on the session's Redis, once serving;
    stopped with SIGTERM afterwards (its whole session SIGKILLed if that does not stop it)."""
    grpc_port = free_port()
    exe = Path(sys.executable).with_name("sdserve")
    log = tmp_path / "sdserve.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [str(exe), "serve", "--model", str(tiny_model), "--grpc-port", str(grpc_port),
             "--http-port", str(free_port()), "--metrics-port", str(free_port()),
             "--compile", "off", "--redis-url", redis_server.url],
            stdout=out, stderr=subprocess.STDOUT, text=True, start_new_session=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )  # fmt: skip
    server = ChaosServer(f"127.0.0.1:{grpc_port}", proc, log)
    try:
        _wait_for_text(server, f"serving DiffusionService on {server.target}", 300)
        yield server
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=120)
    finally:
        kill_session(proc.pid)  # whatever is left of it (nothing, after a clean stop)
        proc.wait()
