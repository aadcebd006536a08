"""The load tester's bookkeeping, driven by an in-process sender (no server)."""

import asyncio

import grpc
import pytest

from sdserve.loadtest import Mix, Record, Report, drive


class FakeRpcError(grpc.aio.AioRpcError):
    def __init__(self, code):
        super().__init__(code, grpc.aio.Metadata(), grpc.aio.Metadata(), details="x")


def test_percentiles_are_nearest_rank():
    report = Report(mode="closed", concurrency=1, rate=None, wall_s=10.0)
    report.records = [Record(i, 0.0, float(i + 1), "OK", 1) for i in range(100)]
    assert report.percentile(50) == 50.0
    assert report.percentile(99) == 99.0
    assert report.summary()["images_per_s"] == pytest.approx(10.0)


def test_drive_is_bounded_counts_errors_and_mixes():
    seen = []

    async def send(request):
        seen.append((request.steps, request.scheduler))
        await asyncio.sleep(0.001)
        if request.seed % 4 == 3:
            raise FakeRpcError(grpc.StatusCode.RESOURCE_EXHAUSTED)
        return 2

    mix = Mix(steps=(5, 10), schedulers=("ddim", "euler", "dpmpp_2m"))
    report = asyncio.run(drive(send, mix=mix, concurrency=3, requests=12))
    summary = report.summary()
    assert summary["requests"] == 12 and summary["ok"] == 9 and summary["images"] == 18
    assert summary["errors"] == {"RESOURCE_EXHAUSTED": 3}
    assert seen[:3] == [(5, "ddim"), (10, "euler"), (5, "dpmpp_2m")]
    with pytest.raises(ValueError):
        asyncio.run(drive(send, concurrency=1))  # unbounded
    with pytest.raises(ValueError):
        asyncio.run(drive(send, concurrency=1, rate=1.0, requests=1))


def test_open_loop_stops_at_the_duration():
    async def send(request):
        return 1

    report = asyncio.run(drive(send, rate=200.0, duration_s=0.3))
    assert report.mode == "open"
    assert 20 < len(report.records) < 120
    assert report.wall_s < 1.0


def test_plot_draws_three_panels_of_a_report(tmp_path):
    from PIL import Image

    from sdserve.loadtest.plot import plot_report

    report = Report(mode="open", concurrency=None, rate=2.0, wall_s=5.0)
    report.records = [Record(i, i * 0.4, 0.5 + 0.1 * (i % 3), "OK", 1) for i in range(10)]
    report.records += [Record(10, 1.0, 0.01, "RESOURCE_EXHAUSTED", 0)]
    out = plot_report(report, tmp_path / "sub" / "plot.png")
    image = Image.open(out)
    assert image.size[0] > 3 * image.size[1]  # three panels side by side
    pixels = image.convert("RGB").getcolors(maxcolors=1 << 20)
    assert len(pixels) > 50  # drawn, not blank
