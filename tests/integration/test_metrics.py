"""Metrics through a real Prometheus server scraping the test cluster with deploy/prometheus.yml,
and one request followed across the replicas' logs by its id."""

from __future__ import annotations

import json
import shutil
import subprocess
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
import yaml
from helpers import REPO_ROOT, dashboard_metrics, free_port

from sdserve.v1 import diffusion_pb2

pytestmark = pytest.mark.integration

REQUEST = dict(prompt="counted", width=64, height=64, steps=4, guidance_scale=7.5)


class Prometheus:
    def __init__(self, url: str):
        self.url = url

    def query(self, expr: str) -> list[dict]:
        qs = urllib.parse.urlencode({"query": expr})
        with urllib.request.urlopen(f"{self.url}/api/v1/query?{qs}", timeout=10) as reply:
            body = json.load(reply)
        assert body["status"] == "success", body
        return body["data"]["result"]

    def value(self, expr: str) -> float:
        """The query's single value; 0 when it has no series (yet)."""
        result = self.query(expr)
        assert len(result) <= 1, result
        return float(result[0]["value"][1]) if result else 0.0

    def settled(self, exprs: list[str], timeout_s: float = 60.0) -> list[float]:
        """The values once they stopped changing (replicas push every 1 s, Prometheus scrapes
        every 1 s): three equal readings 1 s apart."""
        deadline = time.monotonic() + timeout_s
        readings: list[list[float]] = []
        while time.monotonic() < deadline:
            readings.append([self.value(e) for e in exprs])
            if len(readings) >= 3 and readings[-1] == readings[-2] == readings[-3]:
                return readings[-1]
            time.sleep(1.0)
        raise AssertionError(f"{exprs} never settled: {readings[-5:]}")

    def names(self) -> set[str]:
        with urllib.request.urlopen(f"{self.url}/api/v1/label/__name__/values", timeout=10) as r:
            return set(json.load(r)["data"])


@pytest.fixture(scope="module")
def prometheus(server, tmp_path_factory):
    """Prometheus (Debian's package, installed here if missing) on a free port, scraping the
    test cluster's metrics endpoint every second with deploy/prometheus.yml."""
    if shutil.which("prometheus") is None:
        subprocess.run(["bash", str(REPO_ROOT / "deploy" / "install-tools.sh"), "prometheus"],
                       check=True)  # fmt: skip
    work = tmp_path_factory.mktemp("prometheus")
    config = yaml.safe_load((REPO_ROOT / "deploy" / "prometheus.yml").read_text())
    config["global"]["scrape_interval"] = "1s"
    (job,) = [j for j in config["scrape_configs"] if j["job_name"] == "sdserve"]
    # The file Ray's head node keeps, written here for the test cluster (the same format).
    targets = work / "targets.json"
    targets.write_text(json.dumps(
        [{"labels": {"job": "ray"}, "targets": [f"127.0.0.1:{server.config.metrics.export_port}"]}]
    ))  # fmt: skip
    job["file_sd_configs"] = [{"files": [str(targets)]}]
    (work / "prometheus.yml").write_text(yaml.safe_dump(config))
    port = free_port()
    with open(work / "prometheus.log", "wb") as log:
        proc = subprocess.Popen(
            ["prometheus", f"--config.file={work / 'prometheus.yml'}",
             f"--storage.tsdb.path={work / 'data'}", f"--web.listen-address=127.0.0.1:{port}"],
            stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                with urllib.request.urlopen(f"{url}/-/ready", timeout=2):
                    break
            except OSError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise AssertionError((work / "prometheus.log").read_text()[-2000:]) from None
                time.sleep(0.2)
        prom = Prometheus(url)
        # Until its first scrape, Prometheus has no series at all: wait for it, or a "before"
        # reading would be 0 rather than what earlier tests left on the counters.
        while prom.value("max(up)") != 1:
            assert time.monotonic() < deadline + 30, (work / "prometheus.log").read_text()[-2000:]
            time.sleep(0.5)
        yield prom
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_prometheus_counts_images_stages_and_batches(prometheus, stub):
    n = 4
    exprs = [
        "sum(sdserve_images_generated_total)",
        'sum(sdserve_stage_latency_seconds_count{stage="text_encoder"})',
        'sum(sdserve_stage_latency_seconds_count{stage="denoiser"})',
        'sum(sdserve_stage_latency_seconds_count{stage="vae_decoder"})',
        'sum(sdserve_requests_total{rpc="Generate", code="OK"})',
        "sum(sdserve_denoiser_batch_size_count)",
        'sum(sdserve_queue_wait_seconds_count{class="interactive"})',
        "sum(sdserve_denoising_steps_total)",
        'sum(sdserve_slo_requests_total{class="interactive", outcome="met"})',
    ]
    before = prometheus.settled(exprs)
    for seed in range(n):
        stub.Generate(diffusion_pb2.GenerateRequest(**REQUEST, seed=seed), timeout=60)
    deadline = time.monotonic() + 60
    while prometheus.value(exprs[0]) < before[0] + n and time.monotonic() < deadline:
        time.sleep(0.5)
    after = prometheus.settled(exprs)
    deltas = [a - b for a, b in zip(after, before, strict=True)]
    images, text, denoiser, vae, ok, batches, waits, steps, met = deltas
    assert images == n
    assert text == denoiser == vae == n
    assert ok == n
    assert batches >= REQUEST["steps"], "every denoising step adds a batch-size sample"
    assert waits == n
    assert steps == n * REQUEST["steps"]  # one per image per U-Net forward
    assert met == n  # each had a deadline (the call's timeout) and met it

    # The job queue (polled from Redis by the ingress) is there too.
    assert prometheus.value("min(sdserve_redis_up)") == 1
    queues = prometheus.query("max by (priority) (sdserve_jobs_in_queue)")
    assert {r["metric"]["priority"] for r in queues} == {"high", "normal", "low"}


def test_series_carry_the_model_that_made_them(prometheus, stub):
    """Two requests to the SDXL model: its steps and images rise, the default model's do not."""
    exprs = [
        'sum(sdserve_denoising_steps_total{model="sdxl"})',
        'sum(sdserve_images_generated_total{model="sdxl"})',
        'sum(sdserve_stage_latency_seconds_count{model="sdxl", stage="denoiser"})',
        'sum(sdserve_denoising_steps_total{model="default"})',
    ]
    before = prometheus.settled(exprs)
    for seed in range(2):
        request = diffusion_pb2.GenerateRequest(**{**REQUEST, "model": "sdxl"}, seed=seed)
        stub.Generate(request, timeout=60)
    deadline = time.monotonic() + 60
    while prometheus.value(exprs[1]) < before[1] + 2 and time.monotonic() < deadline:
        time.sleep(0.5)
    after = prometheus.settled(exprs)
    assert [a - b for a, b in zip(after, before, strict=True)] == [2 * REQUEST["steps"], 2, 2, 0]


def test_dashboard_metrics_of_ray_serve_are_live(prometheus, stub):
    """The dashboard's Ray Serve queries name series this cluster really exports."""
    stub.Generate(diffusion_pb2.GenerateRequest(**REQUEST), timeout=60)
    wanted = {n for n in dashboard_metrics() if n.startswith("ray_")}
    deadline = time.monotonic() + 30
    while not wanted <= (names := prometheus.names()) and time.monotonic() < deadline:
        time.sleep(1)
    assert wanted <= names, wanted - names


def _serve_logs() -> Path:
    import ray

    return Path(ray._private.worker._global_node.get_logs_dir_path()) / "serve"


def _deployments_logging(text: str, timeout_s: float = 20.0) -> set[str]:
    """Deployments whose replica log files contain `text` (files: replica_APP_DEPLOYMENT_ID.log)."""
    deadline = time.monotonic() + timeout_s
    found: set[str] = set()
    while time.monotonic() < deadline:
        for path in _serve_logs().glob("replica_*.log"):
            if text in path.read_text(errors="replace"):
                found.add(path.name.split("_")[2])
        if {"TextEncoder", "Denoiser", "VaeDecoder"} <= found:
            break
        time.sleep(0.5)
    return found


def test_one_request_can_be_followed_across_replicas(stub):
    reply = stub.Generate(diffusion_pb2.GenerateRequest(**REQUEST), timeout=60)
    assert reply.request_id
    found = _deployments_logging(reply.request_id)
    assert {"Pipeline", "TextEncoder", "Denoiser", "VaeDecoder"} <= found, found


def test_jobs_are_counted_and_followed_across_replicas(prometheus, stub):
    """Two jobs: jobs ended SUCCEEDED and attempts each rise by 2 in Prometheus, and each job's
    id appears in the JobWorker's and every stage's logs."""
    exprs = ['sum(sdserve_jobs_finished_total{state="SUCCEEDED"})',
             "sum(sdserve_job_attempts_total)"]  # fmt: skip
    before = prometheus.settled(exprs)
    submit = diffusion_pb2.SubmitJobRequest(request=diffusion_pb2.GenerateRequest(**REQUEST))
    ids = [stub.SubmitJob(submit, timeout=30).job_id for _ in range(2)]
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        jobs = [stub.GetJob(diffusion_pb2.GetJobRequest(job_id=j), timeout=30) for j in ids]
        if all(j.state == diffusion_pb2.JOB_STATE_SUCCEEDED for j in jobs):
            break
        time.sleep(0.1)
    else:
        raise AssertionError(f"jobs did not succeed: {jobs}")
    deadline = time.monotonic() + 60
    while prometheus.value(exprs[0]) < before[0] + 2 and time.monotonic() < deadline:
        time.sleep(0.5)
    after = prometheus.settled(exprs)
    assert [a - b for a, b in zip(after, before, strict=True)] == [2, 2]
    for job_id in ids:
        found = _deployments_logging(f"job-{job_id}")
        assert {"JobWorker", "TextEncoder", "Denoiser", "VaeDecoder"} <= found, found
