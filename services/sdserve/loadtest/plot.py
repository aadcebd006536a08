"""Pictures of a load test (`sdserve loadtest --plot FILE.png`, and every benchmark run):

1. latency over time: one point per request, at the moment it was sent, coloured by outcome;
2. throughput: images finished in each second of the run;
3. the latency distribution of successful requests (CDF), with p50, p90 and p99 marked.

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
