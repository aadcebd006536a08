"""What a load did: one `Record` per request, and the `Report`'s summary (images/s, latency
percentiles, errors by code, by request kind; SLO attainment and goodput once the records have
SLOs: `sdserve.loadtest.slo`)."""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import asdict, dataclass, field


@dataclass
class Record:
    index: int
    start_s: float
    """Seconds after the run started."""
    latency_s: float
    code: str
    images: int
    kind: str = "text"
    """text (text-to-image), image (image-to-image) or inpaint."""
    slo_s: float | None = None
    """The latency this request had to stay within (`slo.assign_slos`); None: no SLO."""

    @property
    def met_slo(self) -> bool:
        """Ended OK within its SLO (an error, a refusal or a request without an SLO: False)."""
        return self.code == "OK" and self.slo_s is not None and self.latency_s <= self.slo_s


@dataclass
class Report:
    mode: str
    concurrency: int | None
    rate: float | None
    wall_s: float = 0.0
    records: list[Record] = field(default_factory=list)

    @property
    def ok(self) -> list[Record]:
        return [r for r in self.records if r.code == "OK"]

    def percentile(self, q: float) -> float:
        """Latency percentile (0..100) of successful requests, nearest-rank."""
        return _nearest_rank(sorted(r.latency_s for r in self.ok), q)

    def summary(self) -> dict:
        images = sum(r.images for r in self.ok)
        errors = Counter(r.code for r in self.records if r.code != "OK")
        return {
            "mode": self.mode,
            "concurrency": self.concurrency,
            "rate": self.rate,
            "requests": len(self.records),
            "ok": len(self.ok),
            "images": images,
            "wall_s": self.wall_s,
            "images_per_s": images / self.wall_s if self.wall_s else 0.0,
            "p50_s": self.percentile(50),
            "p90_s": self.percentile(90),
            "p99_s": self.percentile(99),
            "mean_s": (sum(r.latency_s for r in self.ok) / len(self.ok)) if self.ok else None,
            "errors": dict(errors),
            "by_kind": self._by_kind(),
        } | self._slo(self.records)

    def _slo(self, records: list[Record]) -> dict:
        """When any record has an SLO: slo_attainment (the share of `records` that met theirs;
        errors, refusals and requests without an SLO are misses), goodput_rps (those met per
        second of the run) and p95_s of the OK ones. Otherwise nothing."""
        if not any(r.slo_s is not None for r in self.records):
            return {}
        met = sum(r.met_slo for r in records)
        return {
            "slo_attainment": met / len(records) if records else float("nan"),
            "goodput_rps": met / self.wall_s if self.wall_s else 0.0,
            "p95_s": _nearest_rank(sorted(r.latency_s for r in records if r.code == "OK"), 95),
        }

    def _by_kind(self) -> dict:
        """Per request kind (text, image, inpaint; MODEL:kind for a named model): OK requests,
        images/s and median latency; with SLOs, as `_slo`."""
        out = {}
        for kind in sorted({r.kind for r in self.records}):
            ok = sorted(r.latency_s for r in self.ok if r.kind == kind)
            images = sum(r.images for r in self.ok if r.kind == kind)
            out[kind] = {
                "ok": len(ok),
                "images_per_s": images / self.wall_s if self.wall_s else 0.0,
                "p50_s": ok[(len(ok) - 1) // 2] if ok else None,
            } | self._slo([r for r in self.records if r.kind == kind])
        return out

    def to_json(self) -> dict:
        return {"summary": self.summary(), "records": [asdict(r) for r in self.records]}


def _nearest_rank(ordered: list[float], q: float) -> float:
    """The q-th (0..100) percentile of sorted values, nearest-rank; NaN for none."""
    if not ordered:
        return float("nan")
    return ordered[max(1, min(len(ordered), math.ceil(q / 100 * len(ordered)))) - 1]


def format_summary(summary: dict) -> str:
    p95 = f"p95 {summary['p95_s']:.3f}s   " if "p95_s" in summary else ""
    lines = [
        f"requests   {summary['requests']} ({summary['ok']} ok) in {summary['wall_s']:.1f}s",
        f"images/s   {summary['images_per_s']:.2f}",
        f"latency    p50 {summary['p50_s']:.3f}s   p90 {summary['p90_s']:.3f}s   "
        f"{p95}p99 {summary['p99_s']:.3f}s",
    ]
    if "slo_attainment" in summary:
        lines.append(f"SLO        {summary['slo_attainment']:.1%} met, goodput "
                     f"{summary['goodput_rps']:.2f} requests/s")  # fmt: skip
    if len(summary.get("by_kind", {})) > 1:
        lines.append("by kind    " + "   ".join(
            f"{kind} {k['ok']} ok, {k['images_per_s']:.2f} img/s" + (
                f", {k['slo_attainment']:.0%} SLO met" if "slo_attainment" in k else "")
            for kind, k in summary["by_kind"].items()))  # fmt: skip
    errors = summary["errors"]
    lines.append(
        "errors     " + (", ".join(f"{k} {v}" for k, v in sorted(errors.items())) or "none")
    )
    return "\n".join(lines)
