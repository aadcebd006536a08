"""What Client and AsyncClient share: each public method is an `Rpc` (the stub method, the
request built from the method's arguments, the conversion of each reply to a client type), and
`ClientBase` holds the channel, the stub, the metadata and the deadline. The two clients differ
only in how they wait: blocking, or awaiting on grpc.aio.
"""

from __future__ import annotations

import contextlib
import io
import os
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, NamedTuple

import grpc

from sdserve.client.types import (
    PRIORITIES,
    ClientError,
    Control,
    ControlNetInfo,
    GenerateResult,
    Job,
    LoraInfo,
    ModelInfo,
    Submitted,
    event_from_pb,
)
from sdserve.v1 import admin_pb2_grpc, diffusion_pb2, diffusion_pb2_grpc

OPTIONS = (
    "negative_prompt", "width", "height", "steps", "guidance_scale", "seed", "scheduler",
    "num_images", "init_image", "strength", "mask_image", "guidance_stop", "cache_interval",
    "model", "loras", "controls", "max_sequence_length", "true_cfg_scale", "shift",
)  # fmt: skip
"""GenerateRequest's optional fields: the `**options` of generate, stream and submit."""

IMAGE_OPTIONS = ("init_image", "mask_image")

API_KEY_VARIABLE = "SDSERVE_API_KEY"
"""Where a client without an `api_key` takes its key from."""

TLS_VARIABLES = {"tls_ca": "SDSERVE_TLS_CA", "tls_cert": "SDSERVE_TLS_CERT",
                 "tls_key": "SDSERVE_TLS_KEY"}  # fmt: skip
"""Where a client takes each TLS file from when it is not given: the CA that signed the
server's certificate, and the client's own certificate and key (mutual TLS)."""


def channel_credentials(
    tls: bool | None = None,
    tls_ca: str | os.PathLike | bytes | None = None,
    tls_cert: str | os.PathLike | bytes | None = None,
    tls_key: str | os.PathLike | bytes | None = None,
) -> grpc.ChannelCredentials | None:
    """TLS credentials for the channel, or None for plaintext. Each file (a path or PEM bytes)
    not given is read from its variable (`TLS_VARIABLES`). `tls`: None uses TLS when any file
    is set; True uses it with the system's trusted CAs when no CA is set; False never."""
    given = {"tls_ca": tls_ca, "tls_cert": tls_cert, "tls_key": tls_key}
    pem = {}
    for name, value in given.items():
        if value is None:
            value = os.environ.get(TLS_VARIABLES[name]) or None
        pem[name] = Path(value).read_bytes() if isinstance(value, str | os.PathLike) else value
    if tls is False or (tls is None and not any(pem.values())):
        return None
    if bool(pem["tls_cert"]) != bool(pem["tls_key"]):
        raise ValueError("a client certificate (tls_cert) needs its key (tls_key), and back")
    return grpc.ssl_channel_credentials(pem["tls_ca"], pem["tls_key"], pem["tls_cert"])


def call_metadata(api_key: str | None = None, application: str | None = None):
    """The metadata of every call: `authorization: Bearer KEY` (KEY: `api_key`, or when that is
    None $SDSERVE_API_KEY; none when empty) and `application` (Serve's application name)."""
    key = (os.environ.get(API_KEY_VARIABLE, "") if api_key is None else api_key).strip()
    pairs = ((("authorization", f"Bearer {key}"),) if key else ()) + (
        (("application", application),) if application else ()
    )
    return pairs or None


def image_bytes(name: str, value: Any) -> bytes:
    """An image option's bytes: bytes as given, a path's contents, a PIL image as PNG."""
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value)
    if isinstance(value, str | os.PathLike):
        return Path(value).read_bytes()
    from PIL import Image

    if isinstance(value, Image.Image):
        buffer = io.BytesIO()
        value.save(buffer, format="PNG")
        return buffer.getvalue()
    raise TypeError(f"{name}: expected bytes, a path or a PIL image, got {type(value).__name__}")


def generate_request(
    prompt: str, options: Mapping[str, Any], preview_every: int = 0
) -> diffusion_pb2.GenerateRequest:
    """The request for `prompt` and `options` (GenerateRequest's field names). Options that are
    None stay unset, so that the server's defaults apply.

    Raises:
        TypeError: naming the options GenerateRequest does not have (nothing is sent).
    """
    unknown = sorted(set(options) - set(OPTIONS))
    if unknown:
        raise TypeError(f"unknown option(s) {', '.join(unknown)}; the options are "
                        f"{', '.join(OPTIONS)}")  # fmt: skip
    fields = {name: value for name, value in options.items() if value is not None}
    for name in set(IMAGE_OPTIONS) & set(fields):
        fields[name] = image_bytes(name, fields[name])
    if "loras" in fields:
        fields["loras"] = [lora_weight(lora) for lora in fields["loras"]]
    if "controls" in fields:
        fields["controls"] = [control_pb(c) for c in fields["controls"]]
    return diffusion_pb2.GenerateRequest(prompt=prompt, preview_every=preview_every, **fields)


def lora_weight(lora: Any) -> diffusion_pb2.LoraWeight:
    """A `loras` entry: "NAME" or "NAME:SCALE", (name, scale), or {"name": ..., "scale": ...}."""
    if isinstance(lora, str):
        name, _, scale = lora.partition(":")
        lora = (name, float(scale)) if scale else (name,)
    if isinstance(lora, Mapping):
        lora = (lora["name"], lora.get("scale"))
    name, scale = (*lora, None)[:2]
    weight = diffusion_pb2.LoraWeight(name=name)
    if scale is not None:
        weight.scale = float(scale)
    return weight


def control_pb(control: Control | Mapping) -> diffusion_pb2.Control:
    """A `controls` entry: a `Control`, or a mapping of its fields."""
    if isinstance(control, Mapping):
        control = Control(**control)
    pb = diffusion_pb2.Control(name=control.name, image=image_bytes("image", control.image),
                               guess_mode=control.guess_mode,
                               preprocess=control.preprocess)  # fmt: skip
    for name in ("scale", "start", "end", "canny_low", "canny_high"):
        if getattr(control, name) is not None:
            setattr(pb, name, float(getattr(control, name)))
    return pb


class Rpc(NamedTuple):
    """One call: `method` of the stub with `request`; `convert` turns each reply into its type."""

    method: str
    request: Any
    convert: Callable[[Any], Any]
    admin: bool = False
    """An AdminService call (else DiffusionService)."""


def generate(prompt: str, options: Mapping[str, Any]) -> Rpc:
    return Rpc("Generate", generate_request(prompt, options), GenerateResult.from_pb)


def stream(prompt: str, preview_every: int, options: Mapping[str, Any]) -> Rpc:
    return Rpc("GenerateStream", generate_request(prompt, options, preview_every), event_from_pb)


def submit(prompt: str, priority: str, idempotency_key: str | None, options,
           callback_url: str | None = None) -> Rpc:  # fmt: skip
    if priority not in PRIORITIES:
        raise ValueError(f"priority: {priority!r} is not one of {', '.join(PRIORITIES)}")
    request = diffusion_pb2.SubmitJobRequest(request=generate_request(prompt, options),
                                             idempotency_key=idempotency_key or "",
                                             priority=PRIORITIES[priority],
                                             callback_url=callback_url or "")  # fmt: skip
    return Rpc("SubmitJob", request, Submitted.from_pb)


def job(method: str, job_id: str) -> Rpc:
    """GetJob, WatchJob or CancelJob."""
    return Rpc(method, diffusion_pb2.GetJobRequest(job_id=job_id), Job.from_pb)


def loras(model: str = "") -> Rpc:
    return Rpc("ListLoras", diffusion_pb2.ListLorasRequest(model=model),
               lambda reply: [LoraInfo.from_pb(f, reply.model) for f in reply.loras])  # fmt: skip


def controlnets(model: str = "") -> Rpc:
    return Rpc("ListControlNets", diffusion_pb2.ListControlNetsRequest(model=model),
               lambda reply: [ControlNetInfo.from_pb(n, reply.model)
                              for n in reply.controlnets])  # fmt: skip


def models() -> Rpc:
    return Rpc("ListModels", diffusion_pb2.ListModelsRequest(),
               lambda reply: [ModelInfo.from_pb(m) for m in reply.models])  # fmt: skip


@contextlib.contextmanager
def rpc_errors() -> Iterator[None]:
    """Raises a grpc.RpcError as a ClientError (with the RpcError as its __cause__)."""
    try:
        yield
    except grpc.RpcError as exc:
        raise ClientError.from_rpc(exc) from exc


def last_job(job: Job | None) -> Job:
    """WatchJob's last Job; a stream that sent none is a server bug."""
    if job is None:
        raise RuntimeError("the server ended WatchJob without sending the job")
    return job


class ClientBase:
    """The constructor and the call start that both clients share."""

    _grpc: Any
    """grpc or grpc.aio: where the channel constructors come from."""

    def __init__(
        self,
        target: str = "127.0.0.1:9000",
        *,
        api_key: str | None = None,
        timeout: float = 600.0,
        application: str | None = None,
        channel: Any = None,
        tls: bool | None = None,
        tls_ca: str | os.PathLike | bytes | None = None,
        tls_cert: str | os.PathLike | bytes | None = None,
        tls_key: str | os.PathLike | bytes | None = None,
    ):
        """`target` is the server's HOST:PORT. `api_key`: None takes $SDSERVE_API_KEY, "" sends
        none. `timeout`: every call's deadline in seconds. `application`: the Serve application,
        when the proxy serves several. `channel`: a channel of your own (the client then does
        not close it, and ignores `target`). TLS: `tls_ca` (the CA of the server's certificate),
        `tls_cert` and `tls_key` (the client's, for mutual TLS) are paths or PEM bytes, each
        taken from $SDSERVE_TLS_CA, $SDSERVE_TLS_CERT, $SDSERVE_TLS_KEY when not given; TLS
        is on when any is set, or with `tls=True` (the system's CAs)."""
        self.target = target
        self.timeout = timeout
        self._metadata = call_metadata(api_key, application)
        self._owns_channel = channel is None
        if channel is None:
            credentials = channel_credentials(tls, tls_ca, tls_cert, tls_key)
            channel = (self._grpc.insecure_channel(target) if credentials is None
                       else self._grpc.secure_channel(target, credentials))  # fmt: skip
        self._channel = channel
        self._stub = diffusion_pb2_grpc.DiffusionServiceStub(self._channel)
        self._admin_stub = admin_pb2_grpc.AdminServiceStub(self._channel)

    def _start(self, rpc: Rpc, timeout: float | None = None):
        """Starts the call: its reply or reply stream (sync), an awaitable call (asyncio)."""
        stub = self._admin_stub if rpc.admin else self._stub
        return getattr(stub, rpc.method)(
            rpc.request,
            timeout=self.timeout if timeout is None else timeout,
            metadata=self._metadata,
        )
