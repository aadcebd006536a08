"""Starting and stopping sdserve on a Ray cluster (`sdserve serve`, and the test fixtures)."""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from sdserve.config import SdserveConfig

logger = logging.getLogger(__name__)


def start_ray(config: SdserveConfig) -> None:
    """Joins `server.ray_address`, or starts a local Ray instance on 127.0.0.1.

    A local instance picks a free port for its GCS: Ray's CLI default, 6379, is where Redis
    listens on most machines.
    """
    import ray

    if ray.is_initialized():
        return
    if config.server.ray_address:
        ray.init(address=config.server.ray_address, logging_level=logging.WARNING)
        return
    ray.init(
        address="local",  # always a new instance, never a cluster found in /tmp/ray
        _node_ip_address=config.server.host,
        include_dashboard=False,
        logging_level=logging.WARNING,
        configure_logging=True,
        _metrics_export_port=metrics_port(config.metrics.export_port, config.server.host),
        _system_config={"metrics_report_interval_ms": int(config.metrics.report_interval_s * 1000)},
    )


def metrics_port(wanted: int, host: str = "127.0.0.1") -> int:
    """`wanted` if it is free on `host`, else a free port (with a warning): a busy 8080 must
    not keep sdserve from starting. Start-up prints the URL either way."""
    import socket

    with socket.socket() as s:
        try:
            s.bind((host, wanted))
            return wanted
        except OSError:
            s.bind((host, 0))
            port = s.getsockname()[1]
    logger.warning("metrics port %d is in use; exporting metrics on port %d instead", wanted, port)
    return port


PROMETHEUS_TARGETS = Path("/tmp/ray/prom_metrics_service_discovery.json")
"""Where Ray's head node lists every node's metrics endpoint for Prometheus (file_sd format);
deploy/prometheus.yml reads it."""


def write_prometheus_targets(path: Path = PROMETHEUS_TARGETS) -> None:
    """Writes the file Ray's dashboard would keep on a head node, for a local Ray started
    without a dashboard. Atomic, so that Prometheus never reads half a file."""
    import json

    targets = metrics_endpoints()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps([{"labels": {"job": "ray"}, "targets": targets}]))
    tmp.replace(path)


def metrics_endpoints() -> list[str]:
    """HOST:PORT of the Prometheus endpoint of every live node of the connected Ray cluster."""
    import ray

    return [
        f"{node['NodeManagerAddress']}:{node['MetricsExportPort']}"
        for node in ray.nodes()
        if node.get("Alive") and node.get("MetricsExportPort")
    ]


def deploy(config: SdserveConfig) -> None:
    """Starts Serve's proxies and deploys the application; the public gRPC port is served by
    each ingress replica's own front door (`serve/front_door.py`), or with `server.front_door:
    serve-proxy` by Serve's gRPC proxy.

    Returns once every deployment is running (every ingress replica's front door listens).
    """
    from ray import serve
    from ray.serve.config import HTTPOptions, gRPCOptions

    from sdserve.serve._ray import set_draining
    from sdserve.serve.app import GRPC_SERVICER_FUNCTIONS, build_app

    server = config.server
    proxy_port = server.grpc_port if server.front_door == "serve-proxy" else server.serve_proxy_port
    serve.start(
        proxy_location=config.server.proxy_location,
        http_options=HTTPOptions(
            host=config.server.host,
            port=config.server.http_port,
            ssl_keyfile=config.server.ssl_keyfile,
            ssl_certfile=config.server.ssl_certfile,
        ),
        # Without servicer functions Serve starts no gRPC proxy: the port is the front door's.
        grpc_options=gRPCOptions(
            port=proxy_port or server.grpc_port,
            grpc_servicer_functions=GRPC_SERVICER_FUNCTIONS if proxy_port else [],
        ),
    )
    set_draining(config.server.app_name, False)  # a flag left by an earlier run of this app
    forget_gone_models(config)
    # The HTTP API's paths start at the root (/v1/images/generations); gRPC ignores the prefix.
    serve.run(build_app(config), name=config.server.app_name, route_prefix="/")


def forget_gone_models(config: SdserveConfig) -> None:
    """Forgets the models added at runtime (`sdserve.serve.admin`) by an earlier run whose
    applications are gone (Serve was shut down); those still running are served again."""
    from sdserve.serve._ray import app_status
    from sdserve.serve.model_apps import model_app_name
    from sdserve.serve.model_registry import ModelRegistry

    registry = ModelRegistry(config.server.app_name)
    for entry in registry.entries():
        if app_status(model_app_name(config.server.app_name, entry.name))[0] == "NOT_STARTED":
            registry.drop(entry.name)
            logger.info("model %s, added by an earlier run, is gone: forgotten", entry.name)


def drain(config: SdserveConfig, *, quiet_polls: int = 3, poll_s: float = 0.5) -> None:
    """Lets running work finish before Serve shuts down (SIGTERM/Ctrl-C to `sdserve serve`).

    Every Pipeline replica then refuses new Generate/SubmitJob calls (UNAVAILABLE; health
    NOT_SERVING) and every JobWorker stops taking jobs (they watch a flag in Ray's cluster KV
    store). Then it waits until no replica of the application has an ongoing request for
    `quiet_polls` polls in a row, at most the longest stage `graceful_shutdown_timeout_s`.
    Queued jobs stay in Redis; a JobWorker's own shutdown waits for its running jobs.
    """
    from sdserve.serve._ray import ongoing_requests, set_draining

    app = config.server.app_name
    set_draining(app, True)
    stages = [config.stage(name, model) for model in config.served_models
              for name in type(config.stages).model_fields
              if name != "safety_checker" or model.safety != "off"]  # fmt: skip
    timeout_s = max(stage.graceful_shutdown_timeout_s for stage in stages if stage is not None)
    deadline = time.monotonic() + timeout_s
    quiet = 0
    while time.monotonic() < deadline and quiet < quiet_polls:
        ongoing = ongoing_requests(app)
        quiet = quiet + 1 if ongoing == 0 else 0
        if ongoing:
            logger.info("draining: %d request(s) still running", ongoing)
        time.sleep(poll_s)


def wait_serving(config: SdserveConfig, timeout_s: float = 300.0) -> None:
    """Waits until the application says every stage of every model answers (the health that
    gRPC's Check reports), asking an ingress replica through Serve: no client certificate or
    trusted CA is needed when the gRPC port speaks TLS."""
    from ray import serve

    handle = serve.get_app_handle(config.server.app_name)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if handle.serving.remote().result(timeout_s=30):
            return
        time.sleep(0.25)
    raise TimeoutError(f"sdserve's stages did not all answer within {timeout_s:.0f}s")


def wait_healthy(target: str, timeout_s: float = 120.0) -> None:
    """Polls grpc.health.v1.Health/Check on plaintext `target` until it answers SERVING."""
    deadline = time.monotonic() + timeout_s
    last: Exception | None = None
    with grpc.insecure_channel(target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            try:
                reply = stub.Check(health_pb2.HealthCheckRequest(), timeout=10)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError as exc:
                last = exc
            time.sleep(0.25)
    raise TimeoutError(f"{target} did not become healthy in {timeout_s:.0f}s: {last}")


def describe_access(config: SdserveConfig) -> None:
    """Says who may call: the API keys' tenants, or that the API is open."""
    from sdserve.api.auth import ApiKeys

    path = config.server.api_key_file
    if not path:
        logger.warning("no API keys (--api-key-file): DiffusionService is open to anyone who "
                       "can reach %s:%d", config.server.host, config.server.grpc_port)  # fmt: skip
        return
    keys = ApiKeys.load(path)
    tenants = sorted({tenant for _, tenant in keys.keys})
    logger.info("API keys: %d from %s, tenants %s", len(keys.keys), path, ", ".join(tenants))


def shutdown() -> None:
    """Removes the application and stops Ray (when this process started it)."""
    import ray
    from ray import serve

    try:
        serve.shutdown()
    finally:
        ray.shutdown()


def serve_forever(config: SdserveConfig) -> None:
    """`sdserve serve`: start, report where it listens, wait for SIGINT/SIGTERM, shut down."""
    stop = threading.Event()

    def _on_signal(signum, _frame):
        logger.info("received %s, shutting down", signal.Signals(signum).name)
        stop.set()

    target = f"{config.server.host}:{config.server.grpc_port}"
    deployed = False
    describe_access(config)  # before Ray starts: a bad key file fails at once
    try:
        # Ray's own processes (GCS, raylet, and through it every replica) inherit the signal
        # mask of the thread that starts them: with SIGTERM blocked there, a SIGTERM to the
        # whole process group or cgroup (systemd's KillMode=control-group) reaches only this
        # process, which drains, then stops Ray itself. Ray already blocks SIGINT in them.
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
        try:
            start_ray(config)
        finally:
            # After ray.init, which installs its own SIGTERM handler in the driver; a SIGTERM
            # that came meanwhile is delivered to ours when unblocked.
            signal.signal(signal.SIGINT, _on_signal)
            signal.signal(signal.SIGTERM, _on_signal)
            signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})
        logger.info(
            "deploying the sdserve application (models: %s)",
            ", ".join(f"{m.name} = {m.path or 'the built-in model'}" for m in config.served_models),
        )
        deploy(config)
        deployed = True
        wait_serving(config)
        if stop.is_set():
            return
        if not config.server.ray_address:
            try:
                write_prometheus_targets()
            except OSError as exc:  # metrics still work; only the file for Prometheus is missing
                logger.warning("could not write %s: %s", PROMETHEUS_TARGETS, exc)
        for endpoint in metrics_endpoints():
            print(f"metrics for Prometheus: http://{endpoint}/metrics", flush=True)
        scheme = "https" if config.server.ssl_certfile else "http"
        http = f"{scheme}://{config.server.host}:{config.server.http_port}"
        print(f"OpenAI-compatible Images API: {http}/v1/images/generations", flush=True)
        print(f"sdserve is serving DiffusionService on {target} (Ctrl-C to stop)", flush=True)
        while not stop.wait(0.5):
            pass
    finally:
        if deployed:
            logger.info("draining: letting running requests and jobs finish")
            try:
                drain(config)
            except Exception:  # a failed drain must not keep the server from stopping
                logger.exception("draining failed; stopping anyway")
        logger.info("stopping Serve and Ray")
        shutdown()
        print("sdserve stopped", flush=True)
