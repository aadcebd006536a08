"""`AsyncClient`: `Client`'s methods as coroutines and async iterators, over grpc.aio."""

from __future__ import annotations

import inspect
from collections.abc import AsyncIterator, Callable
from contextlib import aclosing
from typing import Any

import grpc.aio

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


class AsyncClient(_calls.ClientBase):
    """DiffusionService over a grpc.aio channel: `Client`'s methods, awaited (`stream` is an
    async iterator); `async with` closes the channel. Create it inside the running event loop.

    Close a `stream` you leave early with `contextlib.aclosing` to cancel its request at once
    (otherwise it is cancelled when the iterator is garbage-collected).
    """

    _grpc = grpc.aio

    async def close(self) -> None:
        """Closes the channel (unless it was given to the constructor)."""
        if self._owns_channel:
            await self._channel.close()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc_info) -> None:
        await self.close()

    async def _unary(self, rpc: Rpc):
        with rpc_errors():
            return rpc.convert(await self._start(rpc))

    async def _stream(self, rpc: Rpc, timeout: float | None = None) -> AsyncIterator:
        call = self._start(rpc, timeout)
        try:
            with rpc_errors():
                async for reply in call:
                    yield rpc.convert(reply)
        finally:
            call.cancel()  # a no-op once the stream ended; else the server stops the request

    async def generate(self, prompt: str, **options: Any) -> GenerateResult:
        """As `Client.generate`."""
        return await self._unary(_calls.generate(prompt, options))

    def stream(self, prompt: str, *, preview_every: int = 0,
               **options: Any) -> AsyncIterator[Event]:  # fmt: skip
        """As `Client.stream`, an async iterator."""
        return self._stream(_calls.stream(prompt, preview_every, options))

    async def submit(self, prompt: str, *, priority: str = "normal",
                     idempotency_key: str | None = None, callback_url: str | None = None,
                     **options: Any) -> Submitted:  # fmt: skip
        """As `Client.submit`."""
        return await self._unary(_calls.submit(prompt, priority, idempotency_key, options,
                                               callback_url))  # fmt: skip

    async def job(self, job_id: str) -> Job:
        """As `Client.job`."""
        return await self._unary(_calls.job("GetJob", job_id))

    async def wait(self, job_id: str, *, on_progress: Callable[[Job], Any] | None = None,
                   timeout: float | None = None) -> Job:  # fmt: skip
        """As `Client.wait`; `on_progress` may also be a coroutine function."""
        job = None
        async with aclosing(self._stream(_calls.job("WatchJob", job_id), timeout)) as jobs:
            async for job in jobs:
                if on_progress is not None and inspect.isawaitable(done := on_progress(job)):
                    await done
        return _calls.last_job(job)

    async def cancel(self, job_id: str) -> Job:
        """As `Client.cancel`."""
        return await self._unary(_calls.job("CancelJob", job_id))

    async def loras(self, model: str = "") -> list[LoraInfo]:
        """As `Client.loras`."""
        return await self._unary(_calls.loras(model))

    async def controlnets(self, model: str = "") -> list[ControlNetInfo]:
        """As `Client.controlnets`."""
        return await self._unary(_calls.controlnets(model))

    async def models(self) -> list[ModelInfo]:
        """As `Client.models`."""
        return await self._unary(_calls.models())

    async def add_model(self, name: str, path: str, **settings: Any) -> ModelAdded:
        """As `Client.add_model`."""
        return await self._unary(admin.add_model(name, path, settings))

    async def remove_model(self, name: str) -> ModelRemoved:
        """As `Client.remove_model`."""
        return await self._unary(admin.remove_model(name))

    async def admin_models(self) -> list[AdminModel]:
        """As `Client.admin_models`."""
        return await self._unary(admin.admin_models())
