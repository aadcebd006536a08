"""What a load did: one `Record` per request, and the `Report`'s summary (images/s, latency
percentiles, errors by code, by request kind)."""

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
        latencies = sorted(r.latency_s for r in self.ok)
        if not latencies:
            return float("nan")
        rank = max(1, min(len(latencies), math.ceil(q / 100 * len(latencies))))
        return latencies[rank - 1]

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
        }

    def _by_kind(self) -> dict:
        """Per request kind (text, image, inpaint; MODEL:kind for a named model): OK requests,
        images/s and median latency."""
        out = {}
        for kind in sorted({r.kind for r in self.records}):
            ok = sorted(r.latency_s for r in self.ok if r.kind == kind)
            images = sum(r.images for r in self.ok if r.kind == kind)
            out[kind] = {
                "ok": len(ok),
                "images_per_s": images / self.wall_s if self.wall_s else 0.0,
                "p50_s": ok[(len(ok) - 1) // 2] if ok else None,
            }
        return out

    def to_json(self) -> dict:
        return {"summary": self.summary(), "records": [asdict(r) for r in self.records]}


def format_summary(summary: dict) -> str:
    lines = [
        f"requests   {summary['requests']} ({summary['ok']} ok) in {summary['wall_s']:.1f}s",
        f"images/s   {summary['images_per_s']:.2f}",
        f"latency    p50 {summary['p50_s']:.3f}s   p90 {summary['p90_s']:.3f}s   "
        f"p99 {summary['p99_s']:.3f}s",
    ]
    if len(summary.get("by_kind", {})) > 1:
        lines.append("by kind    " + "   ".join(
            f"{kind} {k['ok']} ok, {k['images_per_s']:.2f} img/s"
            for kind, k in summary["by_kind"].items()))  # fmt: skip
    errors = summary["errors"]
    lines.append(
        "errors     " + (", ".join(f"{k} {v}" for k, v in sorted(errors.items())) or "none")
    )
    return "\n".join(lines)
