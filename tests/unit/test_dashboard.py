"""deploy/grafana and deploy/prometheus.yml: they parse, and every query names a metric that
exists: one sdserve defines (services/sdserve/metrics.py) or one of Ray Serve's."""

from __future__ import annotations

import json
import re
from pathlib import Path

import yaml
from helpers import DASHBOARD, REPO_ROOT, dashboard_metrics

from sdserve.metrics import SPECS, exported_names


def _exprs() -> list[str]:
    dashboard = json.loads(DASHBOARD.read_text())
    return [t["expr"] for panel in dashboard["panels"] for t in panel["targets"]]


def _ray_serve_sources() -> str:
    import ray.serve

    root = Path(ray.serve.__file__).parent
    return "".join(p.read_text() for p in sorted((root / "_private").glob("*.py")))


def test_every_dashboard_query_names_an_exported_metric():
    names = dashboard_metrics()
    ours = {n for n in names if n.startswith("sdserve_")}
    assert ours <= exported_names(), ours - exported_names()
    sources = _ray_serve_sources()
    for name in names - ours:
        # Ray exports its metric "serve_x" as ray_serve_x (+ _total, _bucket, ...).
        base = re.sub(r"_(total|bucket|count|sum)$", "", name.removeprefix("ray_"))
        assert f'"{base}"' in sources, f"{name}: no metric {base!r} in Ray Serve"


def test_the_dashboard_shows_what_operators_need():
    text = " ".join(_exprs())
    for needed in ("sdserve_images_generated_total", "sdserve_stage_latency_seconds_bucket",
                   "sdserve_denoiser_batch_size", "sdserve_jobs_in_queue", 'code!="OK"',
                   "sdserve_gpu_memory_bytes", "histogram_quantile(0.99",
                   "sdserve_unet_busy_ratio"):  # fmt: skip
        assert needed in text, needed


def test_panels_use_the_provisioned_data_source():
    source = yaml.safe_load(
        (REPO_ROOT / "deploy/grafana/provisioning/datasources/prometheus.yml").read_text()
    )
    uid = source["datasources"][0]["uid"]
    dashboard = json.loads(DASHBOARD.read_text())
    for panel in dashboard["panels"]:
        assert panel["datasource"]["uid"] == uid
        assert all(t["datasource"]["uid"] == uid for t in panel["targets"])
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(ids) == len(set(ids))


def test_prometheus_config_renames_ray_prefixed_sdserve_metrics():
    config = yaml.safe_load((REPO_ROOT / "deploy" / "prometheus.yml").read_text())
    (job,) = [j for j in config["scrape_configs"] if j["job_name"] == "sdserve"]
    (rule,) = job["metric_relabel_configs"]
    assert re.fullmatch(rule["regex"], "ray_sdserve_images_generated_total")
    assert not re.fullmatch(rule["regex"], "ray_serve_deployment_request_counter_total")
    assert re.sub(rule["regex"], rule["replacement"].replace("$1", r"\1"),
                  "ray_sdserve_x_total") == "sdserve_x_total"  # fmt: skip


def test_metric_specs_are_unique_and_named_sdserve():
    names = [spec.name for spec in SPECS]
    assert len(names) == len(set(names))
    assert all(name.startswith("sdserve_") for name in names)
    assert all(spec.buckets for spec in SPECS if spec.kind == "histogram")


def test_throughput_latency_and_denoiser_panels_split_by_model():
    """Several models share a server: the panels an operator compares them on group by the
    `model` label every sdserve series carries."""
    text = " ".join(_exprs())
    for needed in ("sum by (model) (rate(sdserve_images_generated_total",
                   "sum by (le, model, stage) (rate(sdserve_stage_latency_seconds_bucket",
                   "sum by (le, model) (rate(sdserve_unet_step_seconds_bucket",
                   "sum by (model) (sdserve_denoiser_waiting_requests)"):  # fmt: skip
        assert needed in text, needed
