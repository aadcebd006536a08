"""Starting and stopping sdserve on a Ray cluster (`sdserve serve`, and the test fixtures)."""

from __future__ import annotations

import logging
import signal
import threading
import time

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
        _metrics_export_port=config.metrics.export_port,
        _system_config={"metrics_report_interval_ms": int(config.metrics.report_interval_s * 1000)},
    )


def metrics_urls() -> list[str]:
    """The Prometheus endpoint of every node of the Ray cluster this process is connected to."""
    import ray

    return [
        f"http://{node['NodeManagerAddress']}:{node['MetricsExportPort']}/metrics"
        for node in ray.nodes()
        if node.get("Alive") and node.get("MetricsExportPort")
    ]


def deploy(config: SdserveConfig) -> None:
    """Starts Serve's proxies (gRPC on `server.grpc_port`) and deploys the application.

    Returns once every deployment is running.
    """
    from ray import serve
    from ray.serve.config import HTTPOptions, gRPCOptions

    from sdserve.deployments.app import GRPC_SERVICER_FUNCTIONS, build_app

    serve.start(
        http_options=HTTPOptions(host=config.server.host, port=config.server.http_port),
        grpc_options=gRPCOptions(
            port=config.server.grpc_port, grpc_servicer_functions=GRPC_SERVICER_FUNCTIONS
        ),
    )
    # A route prefix registers the ingress with the proxies; gRPC ignores its value.
    serve.run(
        build_app(config), name=config.server.app_name, route_prefix=f"/{config.server.app_name}"
    )


def wait_healthy(target: str, timeout_s: float = 120.0) -> None:
    """Polls grpc.health.v1.Health/Check on `target` until it answers SERVING."""
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
    try:
        start_ray(config)
        # After ray.init, which installs its own SIGTERM handler in the driver.
        signal.signal(signal.SIGINT, _on_signal)
        signal.signal(signal.SIGTERM, _on_signal)
        if config.model.path is None:
            # Create the default model once here rather than in every replica at once.
            from sdserve.pipeline.tiny import ensure_default_model

            ensure_default_model(config.model.cache_dir)
        logger.info("deploying the sdserve application (model: %s)", config.model.path or "default")
        deploy(config)
        wait_healthy(target)
        if stop.is_set():
            return
        for url in metrics_urls():
            print(f"metrics for Prometheus: {url}", flush=True)
        print(f"sdserve is serving DiffusionService on {target} (Ctrl-C to stop)", flush=True)
        while not stop.wait(0.5):
            pass
    finally:
        logger.info("stopping Serve and Ray")
        shutdown()
        print("sdserve stopped", flush=True)
