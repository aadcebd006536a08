"""Jobs over the HTTP API (`sdserve.http.jobs_api`) on the session's redis-server, with a Worker
running them through the in-process request path; and the web playground's files."""

from __future__ import annotations

import asyncio
import threading
import uuid

import pytest
from starlette.applications import Starlette
from starlette.routing import Route
from starlette.testclient import TestClient

from sdserve.api.auth import ApiKeys
from sdserve.http.app import HttpApi
from sdserve.http.jobs_api import jobs_route
from sdserve.jobs.queue import JobQueue
from sdserve.jobs.runner import JobRunner
from sdserve.jobs.worker import Worker

pytestmark = pytest.mark.timeout(180)

KEYS = {"team-a": "sk-http-jobs-a-0123456789", "team-b": "sk-http-jobs-b-0123456789"}


def auth(tenant: str) -> dict:
    return {"authorization": f"Bearer {KEYS[tenant]}"}


@pytest.fixture
def jobs_http(redis_server, in_process_path, tmp_path):
    """(a TestClient of the HTTP API with jobs, the queue's key prefix)."""
    keys = tmp_path / "keys.txt"
    keys.write_text("".join(f"{key} {tenant}\n" for tenant, key in KEYS.items()))
    prefix = f"h{uuid.uuid4().hex[:8]}:"
    queue = JobQueue(redis_server.url, key_prefix=prefix, lease_s=2.0)
    api = HttpApi(in_process_path, keys=ApiKeys.load(keys), jobs=queue)

    async def endpoint(request):
        return await api.handle(request, "req-test")

    app = Starlette(routes=[Route("/{path:path}", endpoint, methods=["GET", "POST"])])
    with TestClient(app) as client:  # one event loop for the queue's connections
        yield client, prefix


def run_jobs(redis_server, path, prefix: str, stop: threading.Event, seconds: float):
    """Runs a Worker on the queue until `stop` (at most `seconds`), in a thread with its own
    event loop; returns the thread."""

    async def main():
        queue = JobQueue(redis_server.url, key_prefix=prefix, lease_s=2.0)
        worker = Worker(queue, JobRunner(path), concurrency=2, block_ms=100)
        task = asyncio.create_task(worker.run_forever())
        for _ in range(int(seconds / 0.1)):
            if stop.is_set():
                break
            await asyncio.sleep(0.1)
        worker.stop()
        await asyncio.wait_for(task, timeout=30)
        await queue.close()

    thread = threading.Thread(target=asyncio.run, args=(main(),))
    thread.start()
    return thread


def test_submit_list_watch_and_fetch_a_jobs_images(jobs_http, redis_server, in_process_path):
    http, prefix = jobs_http
    body = {"request": {"prompt": "a job", "num_inference_steps": 3, "seed": 5, "n": 2,
                        "size": "64x64"}, "priority": "high"}  # fmt: skip
    submitted = http.post("/v1/jobs", json=body, headers=auth("team-a"))
    assert submitted.status_code == 200, submitted.text
    job_id = submitted.json()["id"]
    other = http.post("/v1/jobs", json=body, headers=auth("team-b")).json()["id"]
    listed = http.get("/v1/jobs", headers=auth("team-a")).json()["data"]
    assert [j["id"] for j in listed] == [job_id]  # team B's job is not listed for team A
    assert listed[0]["state"] == "QUEUED" and listed[0]["prompt"] == "a job"
    assert http.get(f"/v1/jobs/{other}", headers=auth("team-a")).status_code == 404
    stop = threading.Event()
    worker = run_jobs(redis_server, in_process_path, prefix, stop, seconds=30)
    try:
        for _ in range(300):  # bounded: 30 s
            job = http.get(f"/v1/jobs/{job_id}", headers=auth("team-a")).json()
            if job["state"] == "SUCCEEDED":
                break
            stop.wait(0.1)
    finally:
        stop.set()
        worker.join(timeout=60)
    assert job["state"] == "SUCCEEDED" and job["step"] == job["total_steps"] == 3
    assert [image["seed"] for image in job["images"]] == [5, 6]
    png = http.get(job["images"][1]["url"], headers=auth("team-a"))
    assert png.status_code == 200 and png.content[:4] == b"\x89PNG"
    assert png.headers["content-type"] == "image/png"
    assert http.get(job["images"][1]["url"], headers=auth("team-b")).status_code == 404


def test_cancel_and_refusals_name_the_field(jobs_http):
    http, _ = jobs_http
    body = {"request": {"prompt": "to cancel", "num_inference_steps": 3}}
    job_id = http.post("/v1/jobs", json=body, headers=auth("team-a")).json()["id"]
    cancelled = http.post(f"/v1/jobs/{job_id}/cancel", headers=auth("team-a"))
    assert cancelled.status_code == 200 and cancelled.json()["state"] == "CANCELLED"
    refusals = [
        ({"request": {"prompt": "x", "n": 0}}, "n"),
        ({"request": {"prompt": "x"}, "priority": "urgent"}, "priority"),
        ({"request": {"prompt": "x", "stream": True}}, "stream"),
        ({"prompt": "x"}, "request"),
        ({}, "request"),
    ]
    for body, param in refusals:
        reply = http.post("/v1/jobs", json=body, headers=auth("team-a"))
        assert reply.status_code == 400, body
        assert reply.json()["error"]["param"] == param, reply.json()
    assert http.get("/v1/jobs").status_code == 401
    assert http.get("/v1/jobs/" + "f" * 32, headers=auth("team-a")).status_code == 404


def test_job_routes_are_labelled_without_ids():
    job = "0" * 32
    assert jobs_route(f"/v1/jobs/{job}") == "/v1/jobs/{id}"
    assert jobs_route(f"/v1/jobs/{job}/cancel") == "/v1/jobs/{id}/cancel"
    assert jobs_route(f"/v1/jobs/{job}/images/3.png") == "/v1/jobs/{id}/images/{i}.png"


def test_the_playground_is_served_without_a_key(jobs_http):
    http, _ = jobs_http
    page = http.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "/playground/" in page.text  # it loads its assets from there
    for bad in ("/playground/../app.py", "/playground/x.py", "/playground/missing.js"):
        assert http.get(bad).status_code == 404, bad
