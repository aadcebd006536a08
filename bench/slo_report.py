"""bench_slo's verdicts (issue 30's must-shows, each with its value and target) and the
readable summary of a run."""

from __future__ import annotations

import math

TARGETS = {
    "sweep goodput sdserve/baseline where the baseline's attainment < 90%": (">=", 2.0),
    "backlog (priority): interactive p99 loaded/idle": ("<=", 1.5),
    "backlog (priority): jobs' throughput kept": (">=", 0.5),
    "tenants: B's attainment drop (points)": ("<=", 5.0),
    "flood: admitted requests that missed their deadline": ("<=", 0),
    "flood: worst |refused - expected|": ("<=", None),  # the tolerance, from the run
}


def _values(result: dict) -> dict:
    sweep, backlog = result.get("sweep"), result.get("backlog", {}).get("priority")
    tenants, flood = result.get("tenants"), result.get("flood")
    names = iter(TARGETS)
    return {
        next(names): sweep and sweep["crossing"]["goodput_ratio"],
        next(names): backlog and backlog["p99_loaded_over_idle"],
        next(names): backlog and backlog["jobs_kept"],
        next(names): tenants and tenants["attainment_drop_points"],
        next(names): flood and sum(r["admitted_missed"] for r in flood["runs"]),
        next(names): flood and max(abs(r["refused_off_by"]) for r in flood["runs"]),
    }


def must_show(result: dict) -> dict:
    """Each must-show: its value (None: not run, or not measurable), its target, met or not."""
    out = {}
    for name, value in _values(result).items():
        op, target = TARGETS[name]
        if target is None and result.get("flood"):
            target = result["flood"]["tolerance"]
        met = None
        if value is not None and target is not None and not math.isnan(value):
            met = value >= target if op == ">=" else value <= target
        out[name] = {"value": value, "target": f"{op} {target}", "met": met}
    return out


def _f(value, spec: str = ".2f") -> str:
    return "-" if value is None else format(value, spec)


def _sweep(sweep: dict) -> None:
    print(
        "\nsweep (SLO = the faster system's solo time x scale): per rate, each system's SLO "
        "attainment, goodput (requests/s), p50 / p95 / p99 (s)"
    )
    for row in sweep["rows"]:
        cells = []
        for name in ("sdserve", "baseline"):
            s = row[name]
            cells.append(
                f"{name} {s['slo_attainment']:6.1%} {s['goodput_rps']:5.2f}/s "
                f"{s['p50_s']:5.2f} / {s['p95_s']:5.2f} / {s['p99_s']:5.2f}"
            )
        print(f"  {row['rate']:5.2f}/s   " + "   ".join(cells))
    c = sweep["crossing"]
    if c["rate"] is None:
        print("  the baseline's attainment never fell below 90%: raise --rates")
    else:
        print(
            f"  at {c['rate']:.2f}/s, the lowest rate where the baseline's attainment is below "
            f"90% ({c['baseline_attainment']:.1%}): goodput sdserve {c['sdserve_goodput_rps']:.2f}"
            f"/s, baseline {c['baseline_goodput_rps']:.2f}/s: {_f(c['goodput_ratio'])}x"
        )
    if cap := sweep.get("slo_capacity"):
        sd, base = cap["sdserve"], cap["baseline"]
        at_least = ">= " if sd["lower_bound"] else ""
        print(f"  SLO capacity (the highest rate with 90% of SLOs met, interpolated): sdserve "
              f"{at_least}{sd['rate']:.2f}/s, baseline {base['rate']:.2f}/s: "
              f"{at_least}{_f(cap['ratio'])}x")  # fmt: skip


def _backlog(backlog: dict) -> None:
    print(
        "\nbacklog: interactive p99 idle -> over the job backlog; jobs/s alone -> under "
        "interactive load"
    )
    for policy, b in backlog.items():
        print(
            f"  {policy:>8}: p99 {b['idle']['p99_s']:.2f}s -> {b['loaded']['p99_s']:.2f}s "
            f"({b['p99_loaded_over_idle']:.2f}x); jobs/s {b['jobs_per_s_unloaded']:.2f} -> "
            f"{b['jobs_per_s_loaded']:.2f} ({_f(b['jobs_kept'])} kept); "
            f"{b['jobs_succeeded']} of {b['jobs_submitted']} jobs done"
        )


def _flood(flood: dict) -> None:
    print(
        f"\nflood: unflooded {flood['unflooded_images_per_s']:.2f} images/s, so "
        f"{flood['expected_refused']} expected refused (tolerance {flood['tolerance']})"
    )
    for i, r in enumerate(flood["runs"], 1):
        print(
            f"  run {i}: refused {r['refused']} (off by {r['refused_off_by']:+d}), admitted "
            f"{r['admitted']}, missed their deadline {r['admitted_missed']}, other errors "
            f"{r['other_errors'] or 'none'}"
        )


def print_summary(result: dict) -> None:
    if "sweep" in result:
        _sweep(result["sweep"])
    if "backlog" in result:
        _backlog(result["backlog"])
    if t := result.get("tenants"):
        print(
            f"\ntenants: B's attainment alone {t['alone']['slo_attainment']:.1%}, during A's "
            f"flood {t['flooded']['slo_attainment']:.1%} (drop "
            f"{t['attainment_drop_points']:.1f} points); B's p99 {t['alone']['p99_s']:.2f}s -> "
            f"{t['flooded']['p99_s']:.2f}s"
        )
    if "flood" in result:
        _flood(result["flood"])
    print("\nmust show:")
    for name, m in result["must_show"].items():
        verdict = {True: "met", False: "MISSED", None: "not measured"}[m["met"]]
        value = m["value"] if not isinstance(m["value"], float) else round(m["value"], 3)
        print(f"  {name:<72} {value!s:>8} (target {m['target']}): {verdict}")
    timings = ", ".join(f"{k} {v:.0f}s" for k, v in result["timings_s"].items())
    print(f"\ntimings: {timings}")
