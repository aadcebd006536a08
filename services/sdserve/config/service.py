"""The service's part of the one config tree (`sdserve.config`, which re-exports these classes):
the public endpoints, the job queue and the metrics."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from sdserve.config.deployments import Strict


class JobsConfig(Strict):
    """The asynchronous job queue (SubmitJob/GetJob/WatchJob/CancelJob) on Redis."""

    redis_url: str = "redis://127.0.0.1:6379/0"
    """Redis holding the queue: redis://[:PASSWORD@]HOST:PORT/DB, rediss://... for TLS, or
    unix:///path/redis.sock. Run it with appendonly on, or a Redis restart loses queued jobs."""

    key_prefix: str = "sdserve:"
    """Prefix of every key sdserve writes (several deployments can share one Redis)."""

    result_ttl_s: int = Field(24 * 3600, ge=1)
    """How long an ended job, its images and its idempotency key are kept."""

    max_queue_length: int = Field(10_000, ge=1)
    """Most jobs waiting or running; SubmitJob answers RESOURCE_EXHAUSTED beyond it."""

    max_attempts: int = Field(3, ge=1)
    """Starts of one job before it is FAILED (a worker died or a stage failed each time)."""

    lease_s: float = Field(30.0, gt=0)
    """A running job whose worker has not renewed its lease for this long is taken over by
    another worker. Workers renew every lease_s / 3."""

    concurrency: int = Field(4, ge=1)
    """Jobs each JobWorker replica runs at once (they batch together in the Denoiser)."""

    timeout_s: float = Field(3600.0, ge=0)
    """An attempt at a job still running after this long is cancelled (the Denoiser drops it
    at its next step) and the job retried, or FAILED with DEADLINE_EXCEEDED on its last
    attempt. The worker's slot stays taken until the cancelled attempt has ended. 0: no
    limit."""

    progress_interval_s: float = Field(0.25, ge=0)
    """How often a running job's step is recorded (what WatchJob and GetJob show); the first
    and the last step always are. 0: every step. A cancel reaches a running job at once
    either way."""

    max_connections: int = Field(64, ge=4)
    """Most Redis connections each process's job queue client opens (the ingress's, each
    JobWorker replica's). Each WatchJob, each running job and each worker slot holds one in a
    blocking read: a process that would need more answers UNAVAILABLE after
    `connection_wait_s` rather than opening connections without end. At least
    2 * concurrency + 2."""

    connection_wait_s: float = Field(2.0, gt=0)
    """How long a call waits for a free connection when all `max_connections` are in use,
    before it answers UNAVAILABLE."""

    @model_validator(mode="after")
    def _enough_connections(self) -> JobsConfig:
        if self.max_connections < 2 * self.concurrency + 2:
            raise ValueError(f"jobs.max_connections ({self.max_connections}) is below 2 * "
                             f"jobs.concurrency + 2: the worker's slots would starve")  # fmt: skip
        return self


class ServerConfig(Strict):
    """The Ray cluster and the public endpoint."""

    grpc_port: int = Field(9000, ge=1, le=65535)
    """Port of the public gRPC API (DiffusionService, grpc.health.v1 and reflection)."""

    front_door: Literal["sdserve", "serve-proxy"] = "sdserve"
    """Who serves `grpc_port`: sdserve's own gRPC server in each ingress replica (TLS, the
    client's cancellation and deadline; sdserve/serve/front_door.py), or Ray Serve's gRPC proxy
    (plaintext, cancellation best effort)."""

    serve_proxy_port: int | None = Field(None, ge=1, le=65535)
    """With the own front door: Serve's gRPC proxy also serves the API on this port (plaintext;
    for comparing the two, bench/bench_front_door.py). None: no proxy."""

    grpc_host: str | None = None
    """Address the front door binds on each node (None: `host`; `0.0.0.0` for every
    interface)."""

    tls_cert: str | None = None
    """TLS for the gRPC API: the server's certificate (chain) file, PEM, with `tls_key`."""

    tls_key: str | None = None
    """TLS for the gRPC API: the server's private key file, PEM."""

    tls_client_ca: str | None = None
    """Mutual TLS: clients must present a certificate signed by this CA (PEM) to connect."""

    http_port: int = Field(8000, ge=0, le=65535)
    """Port of Serve's HTTP proxy, which serves the OpenAI-compatible HTTP API
    (`POST /v1/images/generations`, sdserve/http/app.py)."""

    ssl_keyfile: str | None = None
    """HTTPS for the HTTP API: the private key file (with `ssl_certfile`; Serve's own option)."""

    ssl_certfile: str | None = None
    """HTTPS for the HTTP API: the certificate (chain) file."""

    host: str = "127.0.0.1"
    """Address the local Ray node binds to (`sdserve serve` without `--address`)."""

    ray_address: str | None = None
    """An existing Ray cluster to join (`ray://host:10001` or `auto`). None: start a local one."""

    stage_transport: Literal["grpc", "actor"] = "grpc"
    """How the ingress calls the stages: Ray Serve's gRPC transport (`_by_reference=False`,
    faster for tensors, see DESIGN.md) or Ray actor calls."""

    app_name: str = "sdserve"
    """Name of the Serve application."""

    api_key_file: str | None = None
    """A file of API keys, one per line, each optionally followed by its tenant (see
    sdserve/api/auth.py). Set: every DiffusionService call needs `authorization: Bearer KEY` and
    sees only its tenant's jobs. None: anyone who can reach the port may call (start-up says
    so). Every node must see the file at this path."""

    @model_validator(mode="after")
    def _tls_pairs(self) -> ServerConfig:
        if bool(self.tls_cert) != bool(self.tls_key):
            raise ValueError("server.tls_cert and server.tls_key go together")
        if self.tls_client_ca and not self.tls_cert:
            raise ValueError("server.tls_client_ca (mutual TLS) needs server.tls_cert and tls_key")
        if self.tls_cert and self.front_door != "sdserve":
            raise ValueError("gRPC TLS needs server.front_door: sdserve (Serve's proxy has none)")
        return self

    proxy_location: Literal["EveryNode", "HeadOnly"] = "EveryNode"
    """Where Serve runs its gRPC/HTTP proxies: on every node (a load balancer in front spreads
    clients over them), or only on the head node (one public address)."""


class HttpConfig(Strict):
    """The OpenAI-compatible HTTP API (sdserve/http/app.py)."""

    image_ttl_s: int = Field(3600, ge=1)
    """How long an image made with `response_format: url` stays downloadable (kept in the job
    queue's Redis)."""

    max_body_bytes: int = Field(34 * 2**20, ge=1024)
    """Largest request body; a larger one is refused 413 without being read further. 34 MiB:
    two base64 images at `limits.max_image_bytes` (32 MiB) and room for the rest."""


class MetricsConfig(Strict):
    """Prometheus metrics (services/sdserve/metrics.py lists them)."""

    enabled: bool = True
    """Record sdserve's metrics. Ray Serve's own metrics are exported either way."""

    export_port: int = Field(8080, ge=1, le=65535)
    """Port of the local Ray node's Prometheus endpoint (`sdserve serve` without `--address`;
    nodes of an existing cluster use their `ray start --metrics-export-port`)."""

    report_interval_s: float = Field(5.0, ge=1.0)
    """How often replicas push their metrics to the node's endpoint (local Ray only)."""


class WebhooksConfig(Strict):
    """Webhooks for jobs (`SubmitJobRequest.callback_url`): the job worker POSTs a signed JSON
    event to the URL when the job ends (sdserve/jobs/webhooks.py, webhook_sender.py)."""

    allow: tuple[str, ...] = ()
    """HOST or HOST:PORT entries a callback URL may name (`sdserve serve --webhook-allow`);
    a tenant's own entries (`tenants.NAME.webhook_allow`) add to them. Empty, with no tenant
    entries: SubmitJob refuses every callback URL, so that nothing inside the cluster is asked
    to call an arbitrary host."""

    secret: str | None = None
    """The Standard Webhooks signing secret, `whsec_<base64>` (`--webhook-secret`,
    SDSERVE_WEBHOOK_SECRET); a tenant's `webhook_secret` replaces it for its jobs. None:
    callback URLs are refused (FAILED_PRECONDITION) for tenants without a secret of their own."""

    retry_for_s: float = Field(24 * 3600.0, gt=0)
    """How long an undelivered event is retried after its first attempt; then it is kept as
    undeliverable, for inspection (`sdserve job ID`)."""

    backoff_s: float = Field(5.0, gt=0)
    """The wait after the first failed attempt; it doubles after each one."""

    backoff_cap_s: float = Field(3600.0, gt=0)
    """The longest wait between two attempts."""

    timeout_s: float = Field(10.0, gt=0)
    """How long one attempt waits for the receiver's answer."""

    poll_s: float = Field(1.0, gt=0)
    """How often each JobWorker replica looks for ended jobs and due deliveries."""
