"""Load shedding: refuse a request at once, rather than let it time out in a queue.

The ingress polls the Denoiser's load a few times a second (`DenoiserStats.work_ahead`: the
image-steps left of every request it holds; `capacity`: the image-steps per second its recent
fullest batches ran at), and counts the work of the requests it admitted that have not ended
(some of which may not have reached the Denoiser yet: counting only the Denoiser's queue
admitted too many during a burst, measured). The work ahead of a new request is the larger of
the two; of `own` image-steps, it is expected to start after `work_ahead / capacity` seconds
and to end after `(work_ahead + own) / capacity`. It is refused with RESOURCE_EXHAUSTED, and
a hint of when to retry, if it would start later than `max_wait_s`, or if `margin` times its
expected end plus `slack_s` is past its deadline: an admitted request then finishes in time,
and a refused one learns so in milliseconds, not at its deadline.

With several Denoiser replicas, Serve spreads requests over them and each replica's queue and
capacity shrink alike, so the one replica a poll reaches gives the same ratio.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from dataclasses import dataclass

from sdserve.api.types import GenerateParams
from sdserve.errors import ResourceExhausted
from sdserve.stages.messages import DenoiserStats


@dataclass
class Admission:
    max_wait_s: float = 60.0
    margin: float = 1.25
    slack_s: float = 1.0
    denoiser_work: float = 0.0
    """Image-steps the Denoiser holds, at the last poll."""
    outstanding: float = 0.0
    """Image-steps of the requests admitted here that have not ended."""
    capacity: float = 0.0
    """Image-steps per second; 0 until the Denoiser has measured it (everything is admitted)."""

    @property
    def work_ahead(self) -> float:
        return max(self.denoiser_work, self.outstanding)

    def update(self, stats: DenoiserStats) -> None:
        """A fresh reading of the Denoiser's load. The requests admitted here are interactive
        (jobs are queued in Redis instead), so the Denoiser's work ahead of them is its
        interactive work: bulk work pauses for them (`engine.scheduling: priority`) and never
        causes a refusal (with `fifo` it is all its work)."""
        self.denoiser_work = float(stats.interactive_work_ahead)
        self.capacity = stats.capacity

    @contextlib.contextmanager
    def admitted(self, params: GenerateParams, deadline: float | None = None) -> Iterator[None]:
        """Admits the request for the duration of the block (it counts as outstanding work), or
        raises ResourceExhausted with `retry_after_s` set."""
        own = self.admit(params, deadline)
        try:
            yield
        finally:
            self.outstanding -= own

    def admit(self, params: GenerateParams, deadline: float | None = None) -> float:
        """Counts the request in (returns its image-steps; `admitted` gives them back), or
        raises ResourceExhausted with `retry_after_s` set."""
        own = params.steps * params.num_images
        if self.capacity > 0:
            start = self.work_ahead / self.capacity
            end = self.margin * (self.work_ahead + own) / self.capacity + self.slack_s
            if start > self.max_wait_s:
                why = f"it would wait about {start:.0f}s, over the {self.max_wait_s:.0f}s limit"
                raise _busy(why, start - self.max_wait_s)
            left = None if deadline is None else deadline - time.time()
            if left is not None and end > left:
                raise _busy(f"it would end in about {end:.1f}s, after its deadline in "
                            f"{max(left, 0):.1f}s", end - left)  # fmt: skip
        self.outstanding += own
        return own


def _busy(why: str, retry_after_s: float) -> ResourceExhausted:
    error = ResourceExhausted(f"the server is at capacity: {why}; retry later")
    error.retry_after_s = max(1.0, retry_after_s)
    return error
