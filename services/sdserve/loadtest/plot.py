"""Pictures of a load test (`sdserve loadtest --plot FILE.png`, and every benchmark run):

1. latency over time: one point per request, at the moment it was sent, coloured by outcome;
2. throughput: images finished in each second of the run;
3. the latency distribution of successful requests (CDF), with p50, p90 and p99 marked.

and of a rate sweep (`sdserve loadtest --rate-sweep A:B:N --plot FILE.png`, `plot_sweep`): SLO
attainment, goodput and p99 latency against the offered rate, one line per system.

matplotlib draws it off-screen (the Agg backend); nothing needs a display.
"""

from __future__ import annotations

import math
from pathlib import Path

from sdserve.loadtest.report import Report

OUTCOME_COLORS = {"OK": "tab:blue", "RESOURCE_EXHAUSTED": "tab:orange",
                  "DEADLINE_EXCEEDED": "tab:red", "CANCELLED": "tab:gray"}  # fmt: skip
"""Colours of the common outcomes; any other code is drawn in purple."""


def plot_report(report: Report, path: str | Path, title: str = "") -> Path:
    """Draws the three panels of `report` into a PNG at `path` and returns the path."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    fig, (over_time, per_second, cdf) = plt.subplots(1, 3, figsize=(15, 4.2))
    summary = report.summary()
    fig.suptitle(title or _describe(summary), fontsize=11)
    _latency_over_time(over_time, report)
    _throughput(per_second, report)
    _cdf(cdf, report, summary)
    return _save(fig, path)


def _save(fig, path: str | Path) -> Path:
    from matplotlib import pyplot as plt

    fig.tight_layout()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def _describe(summary: dict) -> str:
    load = (f"closed loop, {summary['concurrency']} clients" if summary["mode"] == "closed"
            else f"open loop, {summary['rate']:.2f} requests/s")  # fmt: skip
    return (f"{load}: {summary['requests']} requests, {summary['images_per_s']:.2f} images/s, "
            f"p50 {summary['p50_s']:.2f}s, p99 {summary['p99_s']:.2f}s")  # fmt: skip


def _latency_over_time(ax, report: Report) -> None:
    codes = sorted({r.code for r in report.records}, key=lambda c: (c != "OK", c))
    for code in codes:
        records = [r for r in report.records if r.code == code]
        ax.scatter([r.start_s for r in records], [r.latency_s for r in records], s=10,
                   color=OUTCOME_COLORS.get(code, "tab:purple"),
                   label=f"{code} ({len(records)})")  # fmt: skip
    ax.set(title="latency by send time", xlabel="sent at (s into the run)", ylabel="latency (s)")
    ax.legend(fontsize=8, loc="upper left")


def _throughput(ax, report: Report) -> None:
    seconds = max(1, math.ceil(report.wall_s))
    images = [0] * seconds
    for r in report.ok:
        images[min(seconds - 1, int(r.start_s + r.latency_s))] += r.images
    ax.bar(range(seconds), images, width=1.0, align="edge", color="tab:green")
    ax.set(title="throughput", xlabel="second of the run", ylabel="images finished")


def _cdf(ax, report: Report, summary: dict) -> None:
    latencies = sorted(r.latency_s for r in report.ok)
    if latencies:
        n = len(latencies)
        ax.step(latencies, [(i + 1) / n for i in range(n)], where="post", color="tab:blue")
    for q, style in ((50, ":"), (90, "--"), (99, "-.")):
        value = summary[f"p{q}_s"]
        if not math.isnan(value):
            ax.axvline(value, color="black", linestyle=style, linewidth=1,
                       label=f"p{q} {value:.2f}s")  # fmt: skip
    ax.set(title="latency distribution (OK)", xlabel="latency (s)", ylabel="share of requests",
           ylim=(0, 1.02))  # fmt: skip
    if latencies:
        ax.legend(fontsize=8, loc="lower right")


def plot_sweep(
    reports: list[Report] | dict[str, list[Report]], path: str | Path, title: str = ""
) -> Path:
    """Draws a rate sweep (one open-loop `Report` per offered rate, SLOs assigned:
    `slo.rate_sweep`) into a PNG at `path` and returns the path: SLO attainment (%), goodput
    (requests/s that met their SLO; the diagonal is every offered request met) and p99 latency
    of the OK requests, each against the offered rate. A dict draws several systems on the same
    axes, one line each: `plot_sweep({"sdserve": ours, "baseline": theirs}, path)`."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    systems = reports if isinstance(reports, dict) else {"": reports}
    fig, (attained, goodput, p99) = plt.subplots(1, 3, figsize=(15, 4.2))
    fig.suptitle(title or "SLO attainment, goodput and p99 latency by offered load", fontsize=11)
    highest = 0.0
    for name, sweep in systems.items():
        sweep = sorted(sweep, key=lambda r: r.rate or 0.0)
        rates = [r.rate for r in sweep]
        summaries = [r.summary() for r in sweep]
        line = dict(marker="o", label=name or None)
        attained.plot(rates, [100 * s.get("slo_attainment", math.nan) for s in summaries], **line)
        goodput.plot(rates, [s.get("goodput_rps", math.nan) for s in summaries], **line)
        p99.plot(rates, [s["p99_s"] for s in summaries], **line)
        highest = max([highest, *rates])
    goodput.plot([0, highest], [0, highest], color="gray", linestyle=":", linewidth=1,
                 label="offered")  # fmt: skip
    offered = "offered load (requests/s)"
    attained.set(title="SLO attainment", xlabel=offered, ylabel="requests within SLO (%)")
    goodput.set(title="goodput", xlabel=offered, ylabel="requests/s within SLO")
    p99.set(title="p99 latency (OK)", xlabel=offered, ylabel="latency (s)")
    attained.set_ylim(0, 102)
    for ax in (attained, goodput, p99):
        ax.set_xlim(left=0)
        ax.set_ylim(bottom=0)
        if ax is goodput or len(systems) > 1:
            ax.legend(fontsize=8, loc="best")
    return _save(fig, path)
