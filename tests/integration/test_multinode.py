"""sdserve on a three-node Ray cluster on this machine: per-stage placement from config, and a
GPU-type node lost under load (multinode_driver.py runs the cluster in its own process)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration


def _drive(scenario, tiny_model, redis_server, tmp_path) -> dict:
    report_path = tmp_path / "report.json"
    run = subprocess.run(
        [sys.executable, str(Path(__file__).with_name("multinode_driver.py")), str(tiny_model),
         redis_server.url, str(report_path), scenario],
        capture_output=True, text=True, timeout=480,
    )  # fmt: skip
    assert report_path.exists(), run.stderr[-3000:]
    report = json.loads(report_path.read_text())
    assert run.returncode == 0, (report, run.stderr[-3000:])
    return report


def test_stages_land_where_the_config_says_and_survive_losing_a_node(
    tiny_model, redis_server, tmp_path
):
    report = _drive("node-loss", tiny_model, redis_server, tmp_path)

    cpu, gpus = report["cpu_node"], report["gpu_nodes"]
    placement = report["placement"]
    # One Denoiser replica on each GPU-type node; everything else on the CPU-type node.
    assert sorted(placement["Denoiser"]) == sorted(gpus)
    for deployment in ("Pipeline", "TextEncoder", "VaeDecoder", "JobWorker"):
        assert placement[deployment] == [cpu], (deployment, placement)
    assert report["before"] == ["OK"] * 4

    # One GPU-type node killed: the survivor serves every request after it, and no job is lost.
    survivor = [node for node in gpus if node != report["killed"]]
    assert report["placement_after"]["Denoiser"] == survivor
    assert report["after"] == ["OK"] * 6
    assert [j["state"] for j in report["jobs"]] == ["JOB_STATE_SUCCEEDED"] * 8, report["jobs"]


def test_a_burst_adds_a_denoiser_replica_and_its_end_removes_it(tiny_model, redis_server, tmp_path):
    """Denoiser autoscaling between 1 and 2 replicas: the burst's load adds the second replica,
    the calm after it removes it, and no request or job fails while replicas come and go. The
    driver waits for each change, bounded far from its normal time; the message is the
    timeline of replica counts and of what the driver did."""
    report = _drive("autoscale", tiny_model, redis_server, tmp_path)
    timeline = _timeline(report)
    assert "timed_out" not in report, f"{report['timed_out']}; {timeline}"
    assert [count for _, count in report["timeline"]] == [1, 2, 1], timeline
    assert report["codes"] == ["OK"], report["codes"]
    assert report["requests"] > report["burst_requests"] > 12
    assert [j["state"] for j in report["jobs"]] == ["JOB_STATE_SUCCEEDED"] * 8, report["jobs"]


def _timeline(report: dict) -> str:
    """The report's replica counts and the driver's events in time order, as one line:
    "replicas over time: 0.1s 1 replica, 0.1s burst begins, 21.0s 2 replicas, ..."."""
    seen = [(t, f"{n} replica{'s' if n > 1 else ''}") for t, n in report.get("timeline", [])]
    steps = sorted([*seen, *map(tuple, report.get("events", []))], key=lambda step: step[0])
    return "replicas over time: " + ", ".join(f"{t:.1f}s {what}" for t, what in steps)
