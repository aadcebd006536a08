"""A request's deadline over its stage calls (`StagePath.run`)."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable
from typing import TypeVar

from sdserve.errors import DeadlineExceeded

T = TypeVar("T")


class Within:
    """Bounds a request's stage calls by its deadline (`ends_at`, on the event loop's clock):
    a call that has not answered by then is cancelled (the Serve client then cancels the
    stage's request: `cancel_on_exit`), and the request ends with DeadlineExceeded."""

    def __init__(self, ends_at: float, request_id: str):
        self.ends_at = ends_at
        self.request_id = request_id

    async def __call__(self, awaitable: Awaitable[T], stage: str, grace_s: float = 0.0) -> T:
        """`await awaitable`, or DeadlineExceeded `grace_s` after the deadline."""
        timeout = asyncio.timeout_at(self.ends_at + grace_s)
        try:
            async with timeout:
                return await awaitable
        except TimeoutError:
            if not timeout.expired():
                raise  # the stage's own
            raise DeadlineExceeded(f"request {self.request_id}: its deadline passed in the "
                                   f"{stage}") from None  # fmt: skip

    async def each(
        self, events: AsyncGenerator[T, None], stage: str, grace_s: float = 0.0
    ) -> AsyncIterator[T]:
        """The events of a stream, each awaited within the deadline; the stream is closed
        (its stage call cancelled) when this one is. The bound is around each wait, never
        around a `yield`: a timeout must not fire while the consumer holds the event."""
        async with contextlib.aclosing(events):
            while True:
                try:
                    event = await self(anext(events), stage, grace_s)
                except StopAsyncIteration:
                    return
                yield event


def check_deadline(deadline: float | None, request_id: str, where: str) -> float:
    """Seconds left before `deadline` (0: none); raises DeadlineExceeded once it passed."""
    if deadline is None:
        return 0.0
    left = deadline - time.time()
    if left <= 0:
        raise DeadlineExceeded(f"request {request_id}: its deadline passed {where}")
    return left
