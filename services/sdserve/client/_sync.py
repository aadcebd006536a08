"""`Client`: the blocking client."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import closing
from typing import Any

import grpc

from sdserve.client import _calls, admin
from sdserve.client._calls import Rpc, rpc_errors
from sdserve.client.admin import AdminModel, ModelAdded, ModelRemoved
from sdserve.client.types import (
    ControlNetInfo,
    Event,
    GenerateResult,
    Job,
    LoraInfo,
    ModelInfo,
    Submitted,
)


class Client(_calls.ClientBase):
    """DiffusionService over a blocking gRPC channel; a context manager that closes it.

    Every method raises `ClientError` ("CODE: message") when the RPC fails. `**options` are
    GenerateRequest's optional fields by name (negative_prompt, width, height, steps,
    guidance_scale, seed, scheduler, num_images, init_image, strength, mask_image,
    guidance_stop, cache_interval, model, loras, controls, and for the diffusion transformers
    max_sequence_length, true_cfg_scale (FLUX) and shift); unset or None ones take the server's
    defaults; an unknown name raises TypeError. init_image and mask_image take bytes, a path or
    a PIL image.
    """

    _grpc = grpc

    def close(self) -> None:
        """Closes the channel (unless it was given to the constructor)."""
        if self._owns_channel:
            self._channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def _unary(self, rpc: Rpc):
        with rpc_errors():
            return rpc.convert(self._start(rpc))

    def _stream(self, rpc: Rpc, timeout: float | None = None) -> Iterator:
        call = self._start(rpc, timeout)
        try:
            with rpc_errors():
                for reply in call:
                    yield rpc.convert(reply)
        finally:
            call.cancel()  # a no-op once the stream ended; else the server stops the request

    def generate(self, prompt: str, **options: Any) -> GenerateResult:
        """Generates images for `prompt` (Generate) and returns them when they are done."""
        return self._unary(_calls.generate(prompt, options))

    def stream(self, prompt: str, *, preview_every: int = 0, **options: Any) -> Iterator[Event]:
        """Generates like `generate`, yielding as it goes (GenerateStream): `Queued`, a
        `Progress` per denoising step (with a `Preview` after every `preview_every`-th step
        when set), then the `GenerateResult`. Closing the iterator early (`close()`, `break`
        out of a `with closing(...)`, garbage collection) cancels the request on the server."""
        return self._stream(_calls.stream(prompt, preview_every, options))

    def submit(self, prompt: str, *, priority: str = "normal", idempotency_key: str | None = None,
               callback_url: str | None = None, **options: Any) -> Submitted:  # fmt: skip
        """Queues an asynchronous job (SubmitJob). `priority`: "high", "normal" or "low".
        Submitting again with the same `idempotency_key` returns the first job. `callback_url`:
        where the server POSTs the job's end, signed (a host on its allow-list)."""
        return self._unary(_calls.submit(prompt, priority, idempotency_key, options,
                                         callback_url))  # fmt: skip

    def job(self, job_id: str) -> Job:
        """The job's state (GetJob), with its result once SUCCEEDED."""
        return self._unary(_calls.job("GetJob", job_id))

    def wait(self, job_id: str, *, on_progress: Callable[[Job], Any] | None = None,
             timeout: float | None = None) -> Job:  # fmt: skip
        """Follows the job until it ends (WatchJob) and returns its last state, with the result
        when it SUCCEEDED. `on_progress` is called with each Job as it changes (states, steps).
        `timeout`: seconds to wait (None: the client's timeout)."""
        job = None
        with closing(self._stream(_calls.job("WatchJob", job_id), timeout)) as jobs:
            for job in jobs:
                if on_progress is not None:
                    on_progress(job)
        return _calls.last_job(job)

    def cancel(self, job_id: str) -> Job:
        """Cancels the job (CancelJob): a queued job ends CANCELLED at once, a running one at
        its next step. An ended job is returned unchanged."""
        return self._unary(_calls.job("CancelJob", job_id))

    def loras(self, model: str = "") -> list[LoraInfo]:
        """A served model's LoRA adapters (ListLoras; default: the default model's)."""
        return self._unary(_calls.loras(model))

    def controlnets(self, model: str = "") -> list[ControlNetInfo]:
        """A served model's ControlNets (ListControlNets; default: the default model's)."""
        return self._unary(_calls.controlnets(model))

    def models(self) -> list[ModelInfo]:
        """The served models (ListModels), the default first."""
        return self._unary(_calls.models())

    def add_model(self, name: str, path: str, **settings: Any) -> ModelAdded:
        """Adds a model from a folder on the server (AdminService.AddModel; an admin key).
        `settings`: more of its config-file fields (dtype, scheduler, stages, ...). Returns
        once it serves; give the client a `timeout` of minutes."""
        return self._unary(admin.add_model(name, path, settings))

    def remove_model(self, name: str) -> ModelRemoved:
        """Removes an added model once the requests it holds have ended (RemoveModel)."""
        return self._unary(admin.remove_model(name))

    def admin_models(self) -> list[AdminModel]:
        """Every served model with its source and state (AdminService.ListModels)."""
        return self._unary(admin.admin_models())
