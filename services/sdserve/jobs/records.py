"""What the job queue hands out and answers: job records, deliveries, attempts, outcomes."""

from __future__ import annotations

import enum
from dataclasses import dataclass


class JobState(str, enum.Enum):
    QUEUED = "QUEUED"
    RUNNING = "RUNNING"
    SUCCEEDED = "SUCCEEDED"
    FAILED = "FAILED"
    CANCELLED = "CANCELLED"

    @property
    def ended(self) -> bool:
        return self in (JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED)


class Outcome(str, enum.Enum):
    """How a worker ends an attempt (`JobQueue.end`)."""

    SUCCEEDED = "SUCCEEDED"
    FAILED = "FAILED"
    CANCELLED = "CANCELLED"
    RETRY = "RETRY"
    """A failure worth another attempt: the job goes back to the queue after its lease,
    unless that was its last attempt (then it is FAILED)."""


class Lease(enum.IntEnum):
    """What a lease renewal or a progress report learns (renew.lua and progress.lua)."""

    LOST = -1
    """Another attempt owns the job now (this one's lease ran out), or it has ended."""
    HELD = 0
    """The attempt still owns the job."""
    CANCEL_REQUESTED = 1
    """The attempt owns the job, and CancelJob was called: stop it."""


@dataclass(frozen=True)
class JobRecord:
    """What Redis holds about one job."""

    job_id: str
    state: JobState
    priority: str
    attempts: int
    step: int
    total_steps: int
    error: str
    created_at: float
    started_at: float | None
    finished_at: float | None
    cancel_requested: bool
    worker: str
    request: bytes
    result: bytes | None = None
    tenant: str = ""
    """Who submitted it (an API key's tenant; "" when the server has no keys)."""
    callback_url: str = ""
    """Where its end is delivered (a webhook); "" for none."""

    @classmethod
    def from_hash(cls, job_id: str, h: dict[bytes, bytes], result: bytes | None) -> JobRecord:
        def text(name: str) -> str:
            return h.get(name.encode(), b"").decode()

        def moment(name: str) -> float | None:
            value = text(name)
            return float(value) if value else None

        return cls(
            job_id=job_id,
            state=JobState(text("state")),
            priority=text("priority"),
            attempts=int(text("attempts") or 0),
            step=int(text("step") or 0),
            total_steps=int(text("total_steps") or 0),
            error=text("error"),
            created_at=float(text("created_at") or 0),
            started_at=moment("started_at"),
            finished_at=moment("finished_at"),
            cancel_requested=text("cancel_requested") == "1",
            worker=text("worker"),
            request=h.get(b"request", b""),
            result=result,
            tenant=text("tenant"),
            callback_url=text("callback_url"),
        )


@dataclass(frozen=True)
class Delivery:
    """A stream entry handed to a worker: it owns the job until it ends or its lease expires."""

    stream: str
    entry_id: str
    job_id: str


@dataclass(frozen=True)
class Started:
    """The outcome of `JobQueue.start`: `token` > 0 means "run it" (the attempt number)."""

    token: int
    request: bytes = b""
    total_steps: int = 0
    reason: str = ""
