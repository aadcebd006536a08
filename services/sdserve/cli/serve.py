"""`sdserve serve`: start (or join) a Ray cluster, deploy the application, serve until a signal."""

from __future__ import annotations

import argparse

from sdserve.cli.options import Parents


def register(sub, parents: Parents) -> None:
    serve = sub.add_parser(
        "serve",
        help="start Ray and the sdserve application, serve until Ctrl-C",
        description="Start (or join) a Ray cluster, deploy each model's TextEncoder, VaeEncoder "
        "(models that take image inputs), TextEncoderT5 (SD3/FLUX with "
        "stages.text_encoder_t5), Denoiser and VaeDecoder deployments, the JobWorkers and the "
        "Pipeline, and serve "
        "DiffusionService over gRPC and the OpenAI-compatible Images API over HTTP until "
        "SIGINT/SIGTERM.",
    )
    add_model_options(serve)
    add_server_options(serve)
    add_webhook_options(serve)
    serve.set_defaults(func=run)


def add_model_options(serve) -> None:
    """What is served and how it computes: models, adapters, dtype, compilation."""
    serve.add_argument(
        "--model",
        action="append",
        metavar="[NAME=]DIR",
        help="diffusers-format model folder (default: the built-in model, trained on synthetic "
        "shapes: try 'a red circle on a blue background'). Repeat as NAME=DIR to serve several "
        "models, each with its own stage deployments; the first is the default. NAME=default "
        "is the built-in model",
    )
    serve.add_argument(
        "--lora-dir",
        action="append",
        metavar="[NAME=]DIR",
        help="folder of a model's LoRA adapters (NAME.safetensors files or NAME/ folders) for "
        "GenerateRequest.loras; NAME: a served model (default: the default model). Repeatable. "
        "Default: loras/ inside each model folder (the built-in model ships loras/cyan)",
    )
    serve.add_argument(
        "--dtype",
        choices=["auto", "float32", "float16", "bfloat16"],
        help="every served model's stages compute in this dtype (default auto: bfloat16 on a "
        "CPU with bf16 matmuls in hardware, float16 on CUDA, else float32; `sdserve models` "
        "shows what each stage chose)",
    )
    serve.add_argument(
        "--compile",
        choices=["auto", "off", "default", "max-autotune"],
        help="torch.compile of the Denoisers' U-Nets (default auto: max-autotune on CUDA; on a "
        "CPU a small U-Net is compiled on start-up, about 2 minutes for the built-in model on "
        "2 cores, and a large one such as SD 1.5's runs eagerly, measured faster; off starts "
        "at once and runs eagerly)",
    )


def add_server_options(serve) -> None:
    """Where it serves: ports, TLS, the Ray cluster, Redis, metrics, keys, a config file."""
    serve.add_argument(
        "--grpc-port", type=int, metavar="PORT", help="public gRPC port (default 9000)"
    )
    serve.add_argument(
        "--http-port",
        type=int,
        metavar="PORT",
        help="port of the OpenAI-compatible HTTP API, Serve's HTTP proxy (default 8000)",
    )
    serve.add_argument("--ssl-keyfile", metavar="PATH", help="HTTPS for the HTTP API: key file")
    serve.add_argument(
        "--ssl-certfile", metavar="PATH", help="HTTPS for the HTTP API: certificate file"
    )
    tls = serve.add_argument_group("gRPC TLS (sdserve's own front door)")
    tls.add_argument("--tls-cert", metavar="PEM", help="TLS: the server's certificate (chain)")
    tls.add_argument("--tls-key", metavar="PEM", help="TLS: the server's private key")
    tls.add_argument("--tls-client-ca", metavar="PEM",
                     help="mutual TLS: only clients with a certificate this CA signed")  # fmt: skip
    serve.add_argument(
        "--front-door", choices=["sdserve", "serve-proxy"],
        help="who serves the gRPC port: sdserve's own gRPC server in each ingress replica "
        "(default: TLS, the client's cancellation and deadline) or Ray Serve's gRPC proxy",
    )  # fmt: skip
    serve.add_argument("--host", help="address of the local Ray node (default 127.0.0.1)")
    serve.add_argument(
        "--grpc-host", metavar="ADDR",
        help="the gRPC front door's address (default: --host; 0.0.0.0: all)",
    )  # fmt: skip
    serve.add_argument(
        "--address",
        metavar="ADDR",
        help="join an existing Ray cluster (ray://HOST:10001 or auto) instead of "
        "starting a local one",
    )
    serve.add_argument(
        "--redis-url",
        metavar="URL",
        help="Redis for the job queue: redis://[:PASSWORD@]HOST:PORT/DB or rediss:// for TLS "
        "(default redis://127.0.0.1:6379/0). Without it Generate still serves; the job RPCs "
        "answer UNAVAILABLE",
    )
    serve.add_argument(
        "--metrics-port",
        type=int,
        metavar="PORT",
        help="port of the local Ray node's Prometheus endpoint, with sdserve's and Ray Serve's "
        "metrics (default 8080; start-up prints the URL to scrape)",
    )
    serve.add_argument(
        "--api-key-file",
        metavar="PATH",
        help="API keys, one per line, each optionally followed by its tenant: calls must send "
        "'authorization: Bearer KEY' and see only their tenant's jobs (default: none, the API "
        "is open; also SDSERVE_API_KEY_FILE)",
    )
    serve.add_argument(
        "--config", metavar="FILE", help="YAML config file (see deploy/sdserve.yaml)"
    )


def add_webhook_options(serve) -> None:
    """Webhooks for jobs: which hosts a callback URL may name, and the signing secret."""
    hooks = serve.add_argument_group("webhooks for jobs (SubmitJob's callback_url)")
    hooks.add_argument(
        "--webhook-allow",
        action="append",
        metavar="HOST[:PORT]",
        help="a host callback URLs may name (repeat for several; without a port, any port); "
        "with none, every callback URL is refused",
    )
    hooks.add_argument(
        "--webhook-secret",
        metavar="whsec_...",
        help="the Standard Webhooks secret events are signed with (also SDSERVE_WEBHOOK_SECRET; "
        "`python -c 'from sdserve.jobs.webhooks import new_secret; print(new_secret())'` makes "
        "one)",
    )


def run(args: argparse.Namespace) -> int:
    from sdserve.config import load_config
    from sdserve.serve.server import serve_forever

    models = [parse_model(m) for m in args.model or ()]
    one = len(models) == 1 and models[0]["name"] is None
    config = load_config(
        args.config,
        overrides={
            ("model", "path"): models[0]["path"] if one else None,
            ("models",): [_named(m) for m in models] if models and not one else None,
            ("server", "grpc_port"): args.grpc_port,
            ("server", "http_port"): args.http_port,
            ("server", "ssl_keyfile"): args.ssl_keyfile,
            ("server", "ssl_certfile"): args.ssl_certfile,
            ("server", "ray_address"): args.address,
            ("server", "host"): args.host,
            ("server", "grpc_host"): args.grpc_host,
            ("server", "tls_cert"): args.tls_cert,
            ("server", "tls_key"): args.tls_key,
            ("server", "tls_client_ca"): args.tls_client_ca,
            ("server", "front_door"): args.front_door,
            ("jobs", "redis_url"): args.redis_url,
            ("metrics", "export_port"): args.metrics_port,
            ("server", "api_key_file"): args.api_key_file,
            ("engine", "compile"): args.compile,
            ("webhooks", "allow"): tuple(args.webhook_allow) if args.webhook_allow else None,
            ("webhooks", "secret"): args.webhook_secret,
        },
    )
    config = with_dtype(with_lora_dirs(config, args.lora_dir or ()), args.dtype)
    serve_forever(config)
    return 0


def with_dtype(config, dtype: str | None):
    """The config with every served model's `dtype` set to `dtype` (None: as it was)."""
    from sdserve.config import SdserveConfig

    if dtype is None:
        return config
    tree = config.model_dump()
    for entry in tree["models"] or [tree["model"]]:
        entry["dtype"] = dtype
    return SdserveConfig.model_validate(tree)


def with_lora_dirs(config, specs):
    """The config with each `--lora-dir [NAME=]DIR` as that served model's `lora_dir`."""
    from pathlib import Path

    from sdserve.config import SdserveConfig

    if not specs:
        return config
    tree = config.model_dump()
    entries = tree["models"] or [tree["model"]]
    names = [m.name for m in config.served_models]
    for spec in specs:
        name, sep, folder = spec.partition("=")
        if not sep:
            name, folder = names[0], spec
        if name not in names:
            raise SystemExit(f"--lora-dir {spec}: no served model {name!r} ({', '.join(names)})")
        if not Path(folder).is_dir():
            raise SystemExit(f"--lora-dir {spec}: {folder} is not a folder")
        entries[names.index(name)]["lora_dir"] = str(Path(folder).resolve())
    return SdserveConfig.model_validate(tree)


def parse_model(text: str) -> dict:
    """--model DIR or NAME=DIR (NAME=default: the built-in model) as a `models` entry."""
    name, sep, path = text.partition("=")
    if not sep:
        return {"name": None, "path": text}
    if not name:
        raise SystemExit(f"--model {text}: the name before '=' is empty")
    return {"name": name, "path": None if path in ("", "default") else path}


def _named(model: dict) -> dict:
    """A `models` entry; a folder given without a name is called by its folder's name."""
    from pathlib import Path

    return model if model["name"] else {**model, "name": Path(model["path"]).resolve().name}
