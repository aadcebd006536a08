"""bench_slo's sweep: Poisson rates over a mix of step counts, sizes and samplers, sdserve and
the one-deployment baseline interleaved per rate, each request with an SLO of its solo time
times `scale`; SLO attainment, goodput and latency percentiles per rate, and sdserve's goodput
over the baseline's at the lowest rate where the baseline's attainment falls below 90%."""

from __future__ import annotations

import asyncio
from pathlib import Path

from slo_servers import BASELINE_METADATA, Servers, sender

from sdserve.loadtest import Mix, drive
from sdserve.loadtest.slo import expected_times, rate_sweep

SAMPLERS = ("ddim", "euler", "dpmpp_2m")
STEPS = (10, 25, 50)
GUIDANCE = 7.5
SYSTEMS = ("sdserve", "baseline")
ATTAINMENT_FLOOR = 0.9
"""The baseline's attainment below which the goodput ratio is read (the issue's must-show)."""


def sweep_mix(prompts: tuple[str, ...], size: int, steps: tuple[int, ...] = STEPS) -> Mix:
    """Every step count with every sampler (the samplers' list repeats each one len(steps)
    times, so the two cycles do not move in step), at the native size and at native x half
    (smaller and not square); 18 kinds of request with the defaults, each once in 18."""
    return Mix(
        prompts=prompts,
        steps=steps,
        schedulers=tuple(s for s in SAMPLERS for _ in steps),
        widths=(size, size),
        heights=(size, size // 2),
        guidances=(GUIDANCE,),
    )


def key_name(key) -> str:
    """A JSON key for `slo_key`'s tuple."""
    return "/".join(str(part) for part in key) if isinstance(key, tuple) else str(key)


async def solo_times(servers: Servers, mix: Mix, repeats: int, systems=SYSTEMS) -> dict:
    """Each system's solo time per kind of request (concurrency 1, after a warm-up of a few
    concurrent requests of the mix), and the SLO basis: the faster system's time per kind, so
    that both systems are held to the same SLO."""
    expected: dict[str, dict] = {}
    for name in systems:
        async with _sender(servers, name) as send:
            await drive(send, mix=mix, concurrency=4, requests=8)  # warm-up, batches included
            expected[name] = await expected_times(send, mix, repeats=repeats)
    basis = {key: min(times[key] for times in expected.values()) for key in expected[systems[0]]}
    return {"by_system": expected, "basis": basis}


def _sender(servers: Servers, system: str):
    if system == "sdserve":
        return sender(servers.target, servers.metadata())
    return sender(servers.proxy, BASELINE_METADATA)


async def sweep(
    servers: Servers,
    mix: Mix,
    rates: list[float],
    *,
    requests: int,
    basis: dict,
    scale: float,
    log=print,
) -> dict[str, list]:
    """One open-loop run of `requests` Poisson arrivals per rate and system (the same arrival
    times and requests for both), the systems alternating which goes first; returns each
    system's reports in rate order."""
    reports: dict[str, list] = {name: [] for name in SYSTEMS}
    async with _sender(servers, "sdserve") as sd, _sender(servers, "baseline") as base:
        sends = {"sdserve": sd, "baseline": base}
        for i, rate in enumerate(rates):
            for name in SYSTEMS if i % 2 == 0 else SYSTEMS[::-1]:
                (report,) = await rate_sweep(
                    sends[name],
                    mix,
                    [rate],
                    requests=requests,
                    duration_s=2 * requests / rate + 10,
                    expected=basis,
                    scale=scale,
                )
                reports[name].append(report)
                log(f"  {rate:5.2f}/s {name:>8}: {_line(report.summary())}")
    return reports


def _line(s: dict) -> str:
    return (
        f"attainment {s['slo_attainment']:6.1%}, goodput {s['goodput_rps']:.2f}/s, "
        f"p50 {s['p50_s']:.2f}s, p95 {s['p95_s']:.2f}s, p99 {s['p99_s']:.2f}s, "
        f"{s['ok']}/{s['requests']} ok"
    )


ROW_FIELDS = (
    "rate",
    "requests",
    "ok",
    "slo_attainment",
    "goodput_rps",
    "images_per_s",
    "p50_s",
    "p95_s",
    "p99_s",
    "errors",
    "wall_s",
)


def table(rates: list[float], reports: dict[str, list]) -> list[dict]:
    """One row per rate: each system's attainment, goodput, percentiles and errors."""
    rows = []
    for i, rate in enumerate(rates):
        row: dict = {"rate": rate}
        for name in SYSTEMS:
            summary = reports[name][i].summary()
            row[name] = {k: summary[k] for k in ROW_FIELDS if k in summary} | {"rate": rate}
        rows.append(row)
    return rows


def crossing(rows: list[dict]) -> dict:
    """sdserve's goodput over the baseline's at the lowest rate where the baseline's
    attainment is below 90% (the must-show: at least 2); None where it never falls so low
    (raise --rates) or the baseline met no SLO there."""
    for row in rows:
        if row["baseline"]["slo_attainment"] < ATTAINMENT_FLOOR:
            sd, base = row["sdserve"]["goodput_rps"], row["baseline"]["goodput_rps"]
            return {
                "rate": row["rate"],
                "sdserve_goodput_rps": sd,
                "baseline_goodput_rps": base,
                "sdserve_attainment": row["sdserve"]["slo_attainment"],
                "baseline_attainment": row["baseline"]["slo_attainment"],
                "goodput_ratio": sd / base if base else None,
            }
    return {"rate": None, "goodput_ratio": None}


def slo_capacity(rows: list[dict], system: str) -> dict:
    """The highest offered rate at which `system` still meets 90% of its SLOs: the last rate of
    the sweep before its attainment first falls below, interpolated linearly to where it
    crosses 90% (`lower_bound`: it never fell below, so its capacity is at least the highest
    rate). The goodput ratio at the baseline's first rate below 90% cannot exceed 1 / that
    attainment (just under 1.11 on a fine grid of rates); the capacities' ratio can."""
    last = None
    for row in rows:
        rate, attained = row["rate"], row[system]["slo_attainment"]
        if attained < ATTAINMENT_FLOOR:
            if last is None:
                return {"rate": 0.0, "lower_bound": False}
            (r0, a0) = last
            rate = r0 + (rate - r0) * (a0 - ATTAINMENT_FLOOR) / (a0 - attained)
            return {"rate": rate, "lower_bound": False}
        last = (rate, attained)
    return {"rate": last[0] if last else 0.0, "lower_bound": True}


def capacities(rows: list[dict]) -> dict:
    """Each system's SLO capacity (`slo_capacity`) and sdserve's over the baseline's."""
    out = {name: slo_capacity(rows, name) for name in SYSTEMS}
    base = out["baseline"]["rate"]
    out["ratio"] = out["sdserve"]["rate"] / base if base else None
    out["ratio_is_lower_bound"] = out["sdserve"]["lower_bound"]
    return out


def run_sweep(servers: Servers, mix: Mix, rates: list[float], args, plot: Path):
    """The whole sweep scenario: solo times, the interleaved sweep, the table, the crossing
    and the picture; returns the JSON part and the SLO basis (kind -> seconds)."""
    from sdserve.loadtest.plot import plot_sweep

    solo = asyncio.run(solo_times(servers, mix, args.repeats))
    basis = {key_name(k): round(v, 3) for k, v in solo["basis"].items()}
    print(f"  solo seconds per kind (the faster system's): {basis}", flush=True)
    reports = asyncio.run(
        sweep(
            servers,
            mix,
            rates,
            requests=args.sweep_requests,
            basis=solo["basis"],
            scale=args.slo_scale,
        )
    )
    rows = table(rates, reports)
    plot_sweep({name: reports[name] for name in SYSTEMS}, plot)
    return {
        "solo_s": {
            name: {key_name(k): v for k, v in times.items()}
            for name, times in solo["by_system"].items()
        },
        "slo_basis_s": {key_name(k): v for k, v in solo["basis"].items()},
        "rows": rows,
        "crossing": crossing(rows),
        "slo_capacity": capacities(rows),
        "plot": str(plot),
    }, solo["basis"]
