"""Per-tenant limits: a request rate (with a burst) and a cap on requests in flight, per tenant.

Load shedding (`admission.py`) protects the server from everyone at once; these limits protect
tenants from each other: one tenant's flood is refused at its own limit, in microseconds, and
never spends another tenant's share of the Denoiser. Both refuse the same way, with
ResourceExhausted and a `retry_after_s` hint, which the gRPC edge puts in the trailing metadata
(`retry-after-s`) and the HTTP API turns into 429 with `Retry-After`.

The rate is a token bucket per tenant: it holds up to `burst` tokens, refills at `rate_per_s`,
and each admitted request takes one, so a tenant that was quiet may send `burst` requests at
once and then `rate_per_s` a second. A refused request takes nothing, and the hint is exactly
when the next token arrives. It is a few lines here rather than a library: `aiolimiter` waits
for capacity instead of refusing (and its burst is its rate), and `limits` counts windows
(fixed or moving) rather than a bucket, with a clock of its own; neither gives "refuse now,
retry in S seconds" for a rate and a separate burst, nor lets a test move time.

Limits come from the config's `tenants` (sdserve/config/tenants.py says how an entry applies).
Call `admitted` after the API key is checked: tenant names then come from the key file, so the
buckets kept here stay few.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from sdserve.config import SdserveConfig
from sdserve.config.tenants import DEFAULT_ENTRY, TenantLimitConfig
from sdserve.errors import ResourceExhausted
from sdserve.stats import TenantRequest

CONCURRENCY_RETRY_AFTER_S = 1.0
"""The hint for a tenant at its concurrency cap: when one of its requests will end is not
known here, and a second is a few denoising steps, a fair time to look again."""


@dataclass
class TokenBucket:
    """Tokens that refill at `rate_per_s` up to `size`; starts full (a new tenant may burst)."""

    rate_per_s: float
    size: float
    tokens: float
    updated: float
    """The clock's time when `tokens` was last brought up to date."""

    def refill(self, now: float) -> None:
        self.tokens = min(self.size, self.tokens + (now - self.updated) * self.rate_per_s)
        self.updated = now

    def wait_s(self, now: float) -> float:
        """Seconds until a token is there (0: one is there now)."""
        self.refill(now)
        missing = 1.0 - self.tokens
        return 0.0 if missing <= 1e-9 else missing / self.rate_per_s  # (float refill sums)


class TenantLimits:
    """Each tenant's rate and concurrency, enforced as requests enter (`admitted`).

    Safe to call from several threads (a lock covers each check-and-take; Serve may run the
    gRPC and HTTP handlers on different threads); never blocks beyond that lock.
    """

    def __init__(
        self,
        limits: Mapping[str, TenantLimitConfig] | None = None,
        *,
        record: Callable[[Any], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ):
        """
        Args:
            limits: tenant name -> its limits; the entry "default" covers tenants not listed.
            record: where each decision goes as a `TenantRequest` (a `StatsLogger.record`).
            clock: seconds, monotonic (tests pass a fake one).
        """
        self._limits = dict(limits or {})
        self._record = record
        self._clock = clock
        self._lock = threading.Lock()
        self._buckets: dict[str, TokenBucket] = {}
        self._in_flight: Counter[str] = Counter()

    @classmethod
    def from_config(
        cls, config: SdserveConfig, record: Callable[[Any], None] | None = None
    ) -> TenantLimits:
        """The limits of the config's `tenants`."""
        return cls(config.tenants, record=record)

    def limit_of(self, tenant: str) -> TenantLimitConfig | None:
        """The entry that applies to `tenant` (None: unlimited)."""
        return self._limits.get(tenant, self._limits.get(DEFAULT_ENTRY))

    def in_flight(self, tenant: str) -> int:
        """The tenant's requests admitted that have not ended."""
        return self._in_flight[tenant]

    @contextlib.contextmanager
    def admitted(self, tenant: str) -> Iterator[None]:
        """Admits one request of `tenant` for the duration of the block, or raises
        ResourceExhausted with `retry_after_s` set. The block's slot is given back however it
        ends: normally, by an exception, or by cancellation."""
        self.admit(tenant)
        try:
            yield
        finally:
            self.release(tenant)

    def admit(self, tenant: str) -> None:
        """Counts a request of `tenant` in (`release` counts it out), or raises
        ResourceExhausted with `retry_after_s` set; a refused request takes no token."""
        limit = self.limit_of(tenant)
        error = None
        with self._lock:
            if limit is not None:
                error = self._refusal(tenant, limit)
            if error is None:
                self._in_flight[tenant] += 1
                bucket = self._buckets.get(tenant)
                if bucket is not None:
                    bucket.tokens -= 1.0
        outcome = "admitted" if error is None else error.outcome
        if self._record is not None:
            self._record(TenantRequest(tenant, outcome))
        if error is not None:
            raise error

    def release(self, tenant: str) -> None:
        """A request that `admit` counted in has ended."""
        with self._lock:
            self._in_flight[tenant] -= 1
            if self._in_flight[tenant] <= 0:
                del self._in_flight[tenant]

    def _refusal(self, tenant: str, limit: TenantLimitConfig) -> TenantLimitExceeded | None:
        """Why `tenant` is refused now, or None; the caller holds the lock."""
        held = self._in_flight[tenant]
        if limit.max_concurrent is not None and held >= limit.max_concurrent:
            return TenantLimitExceeded(
                f"tenant {tenant!r} has {held} requests in flight, its limit; retry when one "
                f"ends (in about {CONCURRENCY_RETRY_AFTER_S:g} s)",
                "concurrency_limited",
                CONCURRENCY_RETRY_AFTER_S,
            )
        if limit.rate_per_s is None:
            return None
        now = self._clock()
        bucket = self._buckets.get(tenant)
        if bucket is None:
            size = limit.bucket_size
            bucket = self._buckets[tenant] = TokenBucket(limit.rate_per_s, size, size, now)
        wait = bucket.wait_s(now)
        if wait <= 0:
            return None
        return TenantLimitExceeded(
            f"tenant {tenant!r} is over its rate of {limit.rate_per_s:g} requests/s (burst "
            f"{bucket.size:g}); retry in {_seconds(wait)} s",
            "rate_limited",
            wait,
        )


class TenantLimitExceeded(ResourceExhausted):
    """A tenant's own limit refused the request (RESOURCE_EXHAUSTED, as load shedding is);
    `outcome` says which limit, as the `sdserve_tenant_requests` counter names it."""

    def __init__(self, message: str, outcome: str, retry_after_s: float):
        super().__init__(message)
        self.outcome = outcome
        self.retry_after_s = retry_after_s


def _seconds(s: float) -> str:
    """0.25, 2, 12.5: a wait as a person reads it, never rounded down to 0."""
    return f"{max(round(s, 2), 0.01):g}"
