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
