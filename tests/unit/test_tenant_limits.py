"""Per-tenant limits: a token bucket and a concurrency cap per tenant, refused with a hint.

Time is a fake clock moved by hand: no test sleeps.
"""

from __future__ import annotations

import asyncio
from collections import Counter

import pytest
from pydantic import ValidationError

from sdserve.config import SdserveConfig, load_config
from sdserve.config.tenants import TenantLimitConfig
from sdserve.errors import ResourceExhausted
from sdserve.metrics import Metrics, StatsLogger
from sdserve.orchestration.tenant_limits import CONCURRENCY_RETRY_AFTER_S, TenantLimits


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _limits(clock=None, record=None, **tenants) -> TenantLimits:
    config = {name: TenantLimitConfig(**limit) for name, limit in tenants.items()}
    return TenantLimits(config, record=record, clock=clock or Clock())


def _admit_n(limits: TenantLimits, tenant: str, n: int) -> None:
    for _ in range(n):
        with limits.admitted(tenant):
            pass


def test_a_burst_is_admitted_at_once_then_refused_with_the_buckets_wait():
    """5 at once from a full bucket of 5; the 6th waits for a token at 2/s: 0.5 s."""
    limits = _limits(acme={"rate_per_s": 2, "burst": 5})
    _admit_n(limits, "acme", 5)
    with pytest.raises(ResourceExhausted) as err:
        limits.admit("acme")
    assert err.value.code == "RESOURCE_EXHAUSTED"
    assert err.value.retry_after_s == pytest.approx(0.5)
    assert "tenant 'acme' is over its rate of 2 requests/s" in str(err.value)
    assert "retry in 0.5 s" in str(err.value)


def test_tokens_refill_at_the_rate_and_the_hint_follows_the_bucket():
    clock = Clock()
    limits = _limits(clock, acme={"rate_per_s": 4, "burst": 2})
    _admit_n(limits, "acme", 2)
    clock.now += 0.1  # 0.4 of a token back: 0.15 s to the next
    with pytest.raises(ResourceExhausted) as err:
        limits.admit("acme")
    assert err.value.retry_after_s == pytest.approx(0.15)
    clock.now += 0.15  # the refused request took nothing: the token is there on time
    _admit_n(limits, "acme", 1)
    clock.now += 10.0  # a long quiet spell fills the bucket to its size, not beyond
    _admit_n(limits, "acme", 2)
    with pytest.raises(ResourceExhausted):
        limits.admit("acme")


def test_burst_defaults_to_one_seconds_worth_and_at_least_one():
    assert TenantLimitConfig(rate_per_s=10).bucket_size == 10
    assert TenantLimitConfig(rate_per_s=0.2).bucket_size == 1
    limits = _limits(slow={"rate_per_s": 0.2})
    _admit_n(limits, "slow", 1)
    with pytest.raises(ResourceExhausted) as err:
        limits.admit("slow")
    assert err.value.retry_after_s == pytest.approx(5.0)


def test_the_concurrency_cap_refuses_the_next_while_all_are_held():
    limits = _limits(acme={"max_concurrent": 2})
    with limits.admitted("acme"), limits.admitted("acme"):
        assert limits.in_flight("acme") == 2
        with pytest.raises(ResourceExhausted) as err, limits.admitted("acme"):
            pass
        assert err.value.retry_after_s == CONCURRENCY_RETRY_AFTER_S
        assert "2 requests in flight" in str(err.value)
        assert limits.in_flight("acme") == 2  # the refused one holds nothing
    assert limits.in_flight("acme") == 0
    _admit_n(limits, "acme", 1)


def test_a_block_that_raises_gives_its_slot_back():
    limits = _limits(acme={"max_concurrent": 1})
    with pytest.raises(ValueError), limits.admitted("acme"):
        raise ValueError("the stage failed")
    assert limits.in_flight("acme") == 0
    _admit_n(limits, "acme", 1)


def test_a_cancelled_request_gives_its_slot_back():
    """A Generate call whose client went away is cancelled inside the block (asyncio)."""
    limits = _limits(acme={"max_concurrent": 1})

    async def request(entered: asyncio.Event) -> None:
        with limits.admitted("acme"):
            entered.set()
            await asyncio.Event().wait()  # until cancelled

    async def main() -> None:
        entered = asyncio.Event()
        task = asyncio.create_task(request(entered))
        await entered.wait()
        with pytest.raises(ResourceExhausted):
            limits.admit("acme")
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert limits.in_flight("acme") == 0
        _admit_n(limits, "acme", 1)

    asyncio.run(main())


def test_a_concurrency_refusal_takes_no_token():
    """A client that retries against its concurrency cap does not spend its rate."""
    limits = _limits(acme={"rate_per_s": 1, "burst": 2, "max_concurrent": 1})
    with limits.admitted("acme"):
        for _ in range(5):
            with pytest.raises(ResourceExhausted), limits.admitted("acme"):
                pass
    _admit_n(limits, "acme", 1)  # the second token is still there


def test_one_tenants_flood_never_affects_another():
    clock = Clock()
    limits = _limits(clock, default={"rate_per_s": 1, "burst": 3, "max_concurrent": 2})
    refused = 0
    with limits.admitted("flood"), limits.admitted("flood"):
        for _ in range(100):
            try:
                limits.admit("flood")
            except ResourceExhausted:
                refused += 1
        assert refused == 100
        # the default entry gives numbers, not a shared bucket or cap: quiet has all of its own
        with limits.admitted("quiet"), limits.admitted("quiet"):
            pass
        _admit_n(limits, "quiet", 1)
    _admit_n(limits, "flood", 1)
    with pytest.raises(ResourceExhausted):
        limits.admit("flood")
    clock.now += 1.0
    _admit_n(limits, "flood", 1)


def test_which_entry_applies():
    limits = _limits(default={"max_concurrent": 1}, acme={"rate_per_s": 5}, internal={})
    assert limits.limit_of("acme") == TenantLimitConfig(rate_per_s=5)  # whole: no default cap
    assert limits.limit_of("internal") == TenantLimitConfig()
    assert limits.limit_of("globex") == TenantLimitConfig(max_concurrent=1)
    assert limits.limit_of("") == TenantLimitConfig(max_concurrent=1)  # a server with no keys
    with limits.admitted("internal"), limits.admitted("internal"), limits.admitted("acme"):
        pass
    unlimited = TenantLimits()
    _admit_n(unlimited, "anyone", 1000)


class CountingMetrics:
    """A metric factory that sums every inc per (metric, tags)."""

    def __init__(self):
        self.totals: Counter[tuple[str, frozenset]] = Counter()

    def __call__(self, spec):
        totals = self.totals

        class Metric:
            def inc(self, value=1.0, tags=None):
                totals[spec.name, frozenset((tags or {}).items())] += value

            def observe(self, value, tags=None):
                pass

            set = observe

        return Metric()

    def tenant(self, tenant: str, outcome: str) -> float:
        tags = frozenset({"tenant": tenant, "outcome": outcome}.items())
        return self.totals["sdserve_tenant_requests", tags]


def test_counters_per_tenant_and_outcome():
    counting = CountingMetrics()
    stats = StatsLogger(Metrics(counting))
    limits = _limits(record=stats.record, acme={"rate_per_s": 1, "burst": 2},
                     globex={"max_concurrent": 1})  # fmt: skip
    _admit_n(limits, "acme", 1)
    before = {(t, o): counting.tenant(t, o) for t in ("acme", "globex")
              for o in ("admitted", "rate_limited", "concurrency_limited")}  # fmt: skip
    _admit_n(limits, "acme", 1)
    for _ in range(3):
        with pytest.raises(ResourceExhausted):
            limits.admit("acme")
    with limits.admitted("globex"), pytest.raises(ResourceExhausted):
        limits.admit("globex")
    changes = {key: counting.tenant(*key) - value for key, value in before.items()}
    assert changes == {
        ("acme", "admitted"): 1, ("acme", "rate_limited"): 3, ("acme", "concurrency_limited"): 0,
        ("globex", "admitted"): 1, ("globex", "rate_limited"): 0,
        ("globex", "concurrency_limited"): 1,
    }  # fmt: skip


def test_the_config_tree_holds_the_tenants(tmp_path):
    file = tmp_path / "sdserve.yaml"
    file.write_text(
        "tenants:\n  default: {rate_per_s: 2, burst: 10, max_concurrent: 4}\n  internal: {}\n"
    )
    config = load_config(file, environ={})
    assert config.tenants["default"] == TenantLimitConfig(rate_per_s=2, burst=10, max_concurrent=4)
    assert SdserveConfig.model_validate(config.model_dump()) == config  # as deployments get it
    limits = TenantLimits.from_config(config)
    assert limits.limit_of("internal") == TenantLimitConfig()
    assert limits.limit_of("acme").max_concurrent == 4
    assert SdserveConfig().tenants == {}


@pytest.mark.parametrize("entry", [{"burst": 5}, {"rate_per_s": 0}, {"max_concurrent": 0},
                                   {"rate_per_s": 1, "burst": 0.5}, {"rps": 1}])  # fmt: skip
def test_bad_tenant_entries_are_refused(entry):
    with pytest.raises(ValidationError):
        SdserveConfig.model_validate({"tenants": {"acme": entry}})
