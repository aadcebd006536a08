"""`sdserve loadtest` against the session's server (bounded, 127.0.0.1 only)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import API_KEYS

pytestmark = pytest.mark.integration


def _loadtest(server, *args, tmp_path):
    out = tmp_path / "report.json"
    exe = Path(sys.executable).with_name("sdserve")
    run = subprocess.run(
        [str(exe), "loadtest", "--server", server.target, "--out", str(out), *args],
        capture_output=True, text=True, timeout=180,
        env={**os.environ, "SDSERVE_API_KEY": API_KEYS["tenant-a"]},
    )  # fmt: skip
    return run, (json.loads(out.read_text()) if out.exists() else None)


def test_closed_loop_with_a_mix_and_its_plot(server, tmp_path):
    plot = tmp_path / "load.png"
    run, report = _loadtest(
        server, "--concurrency", "4", "--requests", "8", "--steps", "4,6",
        "--scheduler", "ddim,euler_ancestral", "--width", "64,32", "--plot", str(plot),
        tmp_path=tmp_path,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    from PIL import Image

    assert Image.open(plot).size[0] > 1000 and f"plot: {plot}" in run.stdout
    summary = report["summary"]
    assert summary["requests"] == summary["ok"] == summary["images"] == 8
    assert summary["errors"] == {}
    assert 0 < summary["p50_s"] <= summary["p90_s"] <= summary["p99_s"]
    assert "images/s" in run.stdout and "p99" in run.stdout
    assert sorted(r["index"] for r in report["records"]) == list(range(8))


def test_open_loop_is_bounded_and_counts_errors_by_code(server, tmp_path):
    run, report = _loadtest(
        server, "--rate", "20", "--duration", "2", "--requests", "6", "--steps", "2",
        "--width", "64,60", tmp_path=tmp_path,
    )  # fmt: skip
    summary = report["summary"]
    assert summary["mode"] == "open"
    assert summary["requests"] == 6
    assert summary["ok"] == 3 and summary["errors"] == {"INVALID_ARGUMENT": 3}
    assert "INVALID_ARGUMENT 3" in run.stdout


def test_http_mode_mixes_models_and_counts_http_errors_by_code(server, tmp_path):
    """--http sends the same loads to the OpenAI-compatible API; --model mixes served models
    (split per model in the summary); a bad size comes back as INVALID_ARGUMENT."""
    url = f"http://127.0.0.1:{server.config.server.http_port}"
    run, report = _loadtest(
        server, "--http", url, "--concurrency", "2", "--requests", "8", "--steps", "2",
        "--model", "default,sdxl", "--width", "64,64,64,60", "--height", "64",
        tmp_path=tmp_path,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    summary = report["summary"]
    assert summary["requests"] == 8 and summary["ok"] == 6
    assert summary["errors"] == {"INVALID_ARGUMENT": 2}
    assert {k: v["ok"] for k, v in summary["by_kind"].items()} == {
        "default:text": 4, "sdxl:text": 2
    }  # fmt: skip


def test_rate_sweep_reports_slo_attainment_and_goodput_per_rate(server, tmp_path):
    """--slo-scale measures each shape alone first; --rate-sweep runs one open-loop load per
    rate, prints a line each and a table, and --out holds one report per rate."""
    plot = tmp_path / "sweep.png"
    run, document = _loadtest(
        server, "--slo-scale", "3", "--rate-sweep", "2:8:2", "--requests", "4", "--steps", "2,4",
        "--width", "64", "--height", "64", "--plot", str(plot), tmp_path=tmp_path,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    assert "64x64, 2 steps" in run.stdout and "64x64, 4 steps" in run.stdout
    assert [e["steps"] for e in document["expected_s"]] == [2, 4]
    assert all(e["solo_s"] > 0 for e in document["expected_s"])
    for rate in ("2.00", "8.00"):
        assert f"rate {rate}/s: 4 requests" in run.stdout
    assert "SLO met" in run.stdout and "goodput/s" in run.stdout  # the table
    reports = document["reports"]
    assert [r["summary"]["rate"] for r in reports] == [2.0, 8.0]
    for report in reports:
        summary = report["summary"]
        assert summary["mode"] == "open" and summary["requests"] == summary["ok"] == 4
        assert 0 <= summary["slo_attainment"] <= 1
        met = sum(r["latency_s"] <= r["slo_s"] for r in report["records"])
        assert summary["slo_attainment"] == met / 4
        assert summary["goodput_rps"] == pytest.approx(met / summary["wall_s"])
    assert f"plot: {plot}" in run.stdout and plot.stat().st_size > 0
