"""Per-tenant limits: part of the one config tree (`sdserve.config`, which re-exports this class
as the type of `SdserveConfig.tenants`).

The tree's `tenants` maps a tenant's name (the second column of the API key file,
sdserve/api/auth.py) to its limits; the entry named `default` applies to every tenant not
listed, including the tenant "default" of keys without a tenant and the tenant "" of a server
without a key file. A tenant with no entry, when there is no `default` either, is unlimited.
An entry is whole: a tenant listed without `max_concurrent` has no concurrency cap even if
`default` has one, so what a tenant gets is read off one entry. Each tenant has its own bucket
and its own count of requests in flight; `default` gives numbers, not a shared pool.

    tenants:
      default: {rate_per_s: 2, burst: 10, max_concurrent: 4}
      acme: {rate_per_s: 20, burst: 40, max_concurrent: 16}
      internal: {}          # unlimited

The limits live here rather than in the key file because they belong to a tenant, and a tenant
has several keys: a column per key line would let two of its keys disagree.
"""

from __future__ import annotations

from pydantic import Field, model_validator

from sdserve.config.deployments import Strict

DEFAULT_ENTRY = "default"
"""The `tenants` entry that applies to tenants not listed."""


class TenantLimitConfig(Strict):
    """One tenant's limits (sdserve/orchestration/tenant_limits.py enforces them); a request
    over one is refused RESOURCE_EXHAUSTED (HTTP 429) with a retry-after hint. Every field
    unset: unlimited."""

    rate_per_s: float | None = Field(None, gt=0)
    """Requests per second, on average (a token bucket that refills at this rate). None: no
    rate limit."""

    burst: float | None = Field(None, ge=1)
    """Requests the tenant may send at once after a quiet spell (the bucket's size). None: one
    second's worth of `rate_per_s`, at least 1."""

    webhook_allow: tuple[str, ...] = ()
    """Hosts (HOST or HOST:PORT) this tenant's job callback URLs may name, besides
    `webhooks.allow`."""

    webhook_secret: str | None = None
    """The secret this tenant's webhooks are signed with (`whsec_...`); None: `webhooks.secret`."""

    max_concurrent: int | None = Field(None, ge=1)
    """Requests of the tenant in flight at once (a Generate stream counts until it ends).
    None: no cap."""

    @model_validator(mode="after")
    def _check(self) -> TenantLimitConfig:
        if self.burst is not None and self.rate_per_s is None:
            raise ValueError("tenants: burst needs rate_per_s (the rate the bucket refills at)")
        return self

    @property
    def bucket_size(self) -> float:
        """Tokens the bucket holds when full (only meaningful with `rate_per_s`)."""
        if self.burst is not None:
            return self.burst
        return max(1.0, self.rate_per_s or 0.0)
