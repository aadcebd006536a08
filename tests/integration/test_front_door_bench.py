"""bench/bench_front_door.py in its quick mode, against the session server: its own front
door (TLS) and Serve's gRPC proxy beside it (`server.serve_proxy_port`), and its flood tenant."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
from helpers import API_KEYS, FLOOD, REPO_ROOT

pytestmark = pytest.mark.integration


def test_front_door_bench_runs(server, tmp_path):
    out = tmp_path / "front_door.json"
    proxy = f"127.0.0.1:{server.config.server.serve_proxy_port}"
    run = subprocess.run(
        [sys.executable, "bench/bench_front_door.py", "--quick", "--out", str(out),
         "--target", server.target, "--proxy-target", proxy, "--tls-ca", str(server.certs.ca),
         "--calm-key", API_KEYS["tenant-a"], "--flood-key", FLOOD["key"]],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    report = json.loads(out.read_text())
    results = report["results"]
    for front_door in ("sdserve", "serve-proxy"):  # --quick: 6 sequential calls, 32 from 16
        single, c16 = results[front_door]["single"], results[front_door]["c16"]
        assert single["n"] == 6 and 0 < single["min_s"] <= single["p50_s"] <= single["max_s"]
        assert (c16["requests"], c16["ok"], c16["errors"]) == (32, 32, {})
        assert 0 < c16["images_per_s"] < math.inf
    tenants = results["tenants"]
    for run in tenants["calm"].values():  # calm is not limited: alone or flooded, all OK
        assert run["ok"] == run["requests"] > 0 and run["errors"] == {}
    flood = tenants["flood"]  # 20/s for 3 s against 1/s with a burst of 2
    assert flood["errors"] == ["RESOURCE_EXHAUSTED"] and flood["refused"] > flood["ok"] > 0
    assert flood["refused_with_retry_after"] == flood["refused"]
    assert 0 < flood["retry_after_s_max"] <= 2  # the next token: at most 1/rate away
    assert flood["ok"] <= 2 + tenants["seconds"] * 1.0 + 1  # the burst, the rate, one in flight
    assert set(report["ratios"]) == {"single p50 latency, own/proxy", "c16 images/s, own/proxy",
                                     "calm p99 loaded/alone"}  # fmt: skip
    assert all(0 < ratio < math.inf for ratio in report["ratios"].values())
