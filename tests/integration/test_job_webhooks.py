"""Webhooks for jobs through the running server: a real HTTP receiver on 127.0.0.1 gets each
job's end, signed as Standard Webhooks are (verified with the `svix` package), retried until
delivered, and delivered after the JobWorker processes are killed (their state is in Redis)."""

from __future__ import annotations

import base64
import json
import os
import signal
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import grpc
import pytest
from helpers import WEBHOOK_SECRET, free_port
from svix.webhooks import Webhook

from sdserve.v1 import diffusion_pb2

pytestmark = pytest.mark.integration

QUICK = dict(prompt="a hooked job", width=32, height=32, steps=2, guidance_scale=1.0,
             scheduler="ddim")  # fmt: skip


class Receiver:
    """An HTTP server on 127.0.0.1 that answers `fail_first` POSTs with 500, then 200, and
    keeps every request it was sent (headers, body)."""

    def __init__(self, fail_first: int = 0, port: int | None = None):
        self.fail_first, self.received = fail_first, []
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 (http.server's name)
                body = self.rfile.read(int(self.headers["content-length"]))
                receiver.received.append((dict(self.headers.items()), body))
                failing = len(receiver.received) <= receiver.fail_first
                self.send_response(500 if failing else 200)
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", port or free_port()), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def wait(self, count: int, timeout_s: float = 60.0) -> list[tuple[dict, bytes]]:
        deadline = time.monotonic() + timeout_s
        while len(self.received) < count and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(self.received) >= count, f"got {len(self.received)} of {count} deliveries"
        return self.received

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def _submit(stub, url: str, **fields):
    request = diffusion_pb2.GenerateRequest(**{**QUICK, **fields})
    return stub.SubmitJob(diffusion_pb2.SubmitJobRequest(request=request, callback_url=url),
                          timeout=30).job_id  # fmt: skip


def _verified(headers: dict, body: bytes) -> dict:
    """The event, once svix's verifier accepts its signature."""
    Webhook(WEBHOOK_SECRET).verify(body, headers)  # raises WebhookVerificationError if not
    return json.loads(body)


def _attempts(stub, job_id: str, count: int, timeout_s: float = 30.0):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        job = stub.GetJob(diffusion_pb2.GetJobRequest(job_id=job_id), timeout=30)
        if len(job.webhook_attempts) >= count:
            return job
        time.sleep(0.1)
    raise AssertionError(f"job {job_id}: {len(job.webhook_attempts)} of {count} attempts")


def test_a_job_end_is_delivered_signed_with_its_images(stub):
    receiver = Receiver()
    try:
        job_id = _submit(stub, receiver.url, seed=5)
        ((headers, body),) = receiver.wait(1)
        event = _verified(headers, body)
        assert event["type"] == "job.succeeded" and event["data"]["job_id"] == job_id
        job = _attempts(stub, job_id, 1)
        assert job.state == diffusion_pb2.JOB_STATE_SUCCEEDED and job.callback_url == receiver.url
        pngs = [base64.b64decode(b) for b in event["data"]["images_b64"]]
        assert pngs == [image.png for image in job.result.images]
        assert [a.status for a in job.webhook_attempts] == [200]
        time.sleep(1.0)  # several sweeps later: sent once
        assert len(receiver.received) == 1
    finally:
        receiver.close()


def test_a_receiver_that_fails_twice_gets_the_event_on_the_third_attempt(stub):
    receiver = Receiver(fail_first=2)
    try:
        job_id = _submit(stub, receiver.url)
        received = receiver.wait(3)
        ids = {headers["webhook-id"] for headers, _ in received}
        assert len(ids) == 1  # one event, retried
        assert _verified(*received[2])["data"]["job_id"] == job_id
        job = _attempts(stub, job_id, 3)
        assert [a.status for a in job.webhook_attempts] == [500, 500, 200]
    finally:
        receiver.close()


def test_a_callback_off_the_allow_list_or_malformed_is_refused_by_name(stub):
    for url, code in (("http://hooks.example.com/x", grpc.StatusCode.PERMISSION_DENIED),
                      ("ftp://127.0.0.1/x", grpc.StatusCode.INVALID_ARGUMENT)):  # fmt: skip
        with pytest.raises(grpc.RpcError) as err:
            _submit(stub, url)
        assert err.value.code() == code and "callback_url" in err.value.details()


def _job_worker_pids(app_name: str, replicas: int = 2, timeout_s: float = 120.0) -> set[int]:
    """The processes of the JobWorker replicas (their Stats name "host:pid:id"), once
    `replicas` distinct ones answer (Serve routes each call to one of them)."""
    from ray import serve

    handle = serve.get_deployment_handle("JobWorker", app_name=app_name)
    pids: set[int] = set()
    deadline = time.monotonic() + timeout_s
    while len(pids) < replicas and time.monotonic() < deadline:
        try:
            stats = json.loads(handle.Stats.remote(b"").result(timeout_s=10))
        except Exception:  # a replica that Serve has not replaced yet
            time.sleep(0.5)
            continue
        pids.add(int(stats["consumer"].split(":")[1]))
    assert len(pids) == replicas, pids
    return pids


def test_an_end_not_yet_delivered_is_delivered_after_the_workers_are_killed(stub, server):
    """The receiver is down when the job ends; both JobWorker processes are SIGKILLed; once
    Serve has restarted them and the receiver is up, the event arrives: its state was in
    Redis, not in the killed processes."""
    port = free_port()
    job_id = _submit(stub, f"http://127.0.0.1:{port}/hook")
    _attempts(stub, job_id, 1)  # an attempt failed: nobody listens yet
    app = server.config.server.app_name
    pids = _job_worker_pids(app)
    for pid in pids:
        os.kill(pid, signal.SIGKILL)
    receiver = Receiver(port=port)
    try:
        (headers, body), *_ = receiver.wait(1, timeout_s=120)
        assert _verified(headers, body)["data"]["job_id"] == job_id
        assert not pids & _job_worker_pids(app)  # delivered by new processes
        job = _attempts(stub, job_id, 2)
        assert job.webhook_attempts[-1].status == 200
        assert all(a.status == 0 for a in job.webhook_attempts[:-1])  # no reply while down
    finally:
        receiver.close()
