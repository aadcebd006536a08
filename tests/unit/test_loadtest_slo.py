"""SLO attainment and goodput (sdserve.loadtest.slo), with fake senders that take a set time per
step count: no server."""

import asyncio
import json
from functools import partial

import pytest

from sdserve.cli import main
from sdserve.loadtest import (
    Mix,
    Record,
    Report,
    SendError,
    Target,
    assign_slos,
    drive,
    expected_times,
    format_summary,
    format_sweep,
    parse_sweep,
    rate_sweep,
    slo_key,
)
from sdserve.v1 import diffusion_pb2

TICK = 0.005
"""Seconds a fake request takes per denoising step."""


def fake_sender(fail_steps: int | None = None):
    """A sender that sleeps TICK × steps (one at a time or not), failing requests of
    `fail_steps` steps; it keeps what it was sent and its highest concurrency."""
    state = {"sent": [], "in_flight": 0, "most": 0}

    async def send(request: diffusion_pb2.GenerateRequest) -> int:
        state["sent"].append(request)
        state["in_flight"] += 1
        state["most"] = max(state["most"], state["in_flight"])
        try:
            await asyncio.sleep(TICK * request.steps)
            if request.steps == fail_steps:
                raise SendError("INVALID_ARGUMENT")
            return 1
        finally:
            state["in_flight"] -= 1

    return send, state


def test_attainment_counts_errors_refusals_and_slow_requests_as_misses():
    report = Report(mode="open", concurrency=None, rate=2.0, wall_s=4.0)
    report.records = [
        Record(0, 0.0, 1.0, "OK", 1, slo_s=2.0),  # met
        Record(1, 0.1, 2.0, "OK", 1, slo_s=2.0),  # met, exactly at the SLO
        Record(2, 0.2, 2.5, "OK", 1, slo_s=2.0),  # too slow
        Record(3, 0.3, 0.1, "RESOURCE_EXHAUSTED", 0, slo_s=2.0),  # fast, but refused
        Record(4, 0.4, 0.0, "CLIENT_OVERLOAD", 0, slo_s=2.0),
        Record(5, 0.5, 0.5, "OK", 1, slo_s=None),  # no expected time: a miss
        Record(6, 0.6, 0.5, "OK", 1, kind="image", slo_s=1.0),  # met
        Record(7, 0.7, 1.5, "OK", 1, kind="image", slo_s=1.0),
    ]
    summary = report.summary()
    assert summary["slo_attainment"] == pytest.approx(3 / 8)
    assert summary["goodput_rps"] == pytest.approx(3 / 4.0)
    assert summary["p95_s"] == 2.5  # nearest rank among the 6 OK: 0.5, 0.5, 1, 1.5, 2, 2.5
    assert summary["by_kind"]["text"]["slo_attainment"] == pytest.approx(2 / 6)
    assert summary["by_kind"]["image"]["slo_attainment"] == pytest.approx(1 / 2)
    assert summary["by_kind"]["image"]["goodput_rps"] == pytest.approx(1 / 4.0)
    assert summary["ok"] == 6 and summary["requests"] == 8  # the old keys, unchanged
    text = format_summary(summary)
    assert "37.5% met" in text and "goodput 0.75 requests/s" in text and "p95 2.500s" in text


def test_without_slos_the_summary_has_no_slo_keys():
    report = Report(mode="closed", concurrency=1, rate=None, wall_s=1.0)
    report.records = [Record(0, 0.0, 1.0, "OK", 1)]
    summary = report.summary()
    assert not {"slo_attainment", "goodput_rps", "p95_s"} & set(summary)
    assert "slo_attainment" not in summary["by_kind"]["text"]
    assert "SLO" not in format_summary(summary) and "p95" not in format_summary(summary)


def test_slo_key_is_model_size_steps_and_scheduler_with_unset_values():
    request = diffusion_pb2.GenerateRequest(prompt="x", width=64, steps=4, scheduler="ddim")
    assert slo_key(request) == ("", 64, 0, 4, "ddim")
    request.seed, request.guidance_scale = 7, 9.0  # not part of the shape
    assert slo_key(request) == ("", 64, 0, 4, "ddim")


def test_expected_times_sends_each_shape_alone_and_takes_the_median():
    send, state = fake_sender()
    mix = Mix(steps=(2, 8), widths=(64, 64, 32))  # 6 requests a cycle, 4 shapes
    expected = asyncio.run(expected_times(send, mix, repeats=3))
    assert set(expected) == {("", w, 0, s, "") for w in (64, 32) for s in (2, 8)}
    assert state["most"] == 1  # concurrency 1
    assert len(state["sent"]) == 4 * (1 + 3)  # a warm-up and three repeats a shape
    for (_, _, _, steps, _), solo in expected.items():
        assert TICK * steps <= solo < TICK * steps + 0.05


def test_expected_times_leaves_out_shapes_that_fail_and_raises_when_all_do():
    send, _ = fake_sender(fail_steps=3)
    expected = asyncio.run(expected_times(send, Mix(steps=(1, 3)), repeats=1, warmups=0))
    assert list(expected) == [("", 0, 0, 1, "")]
    with pytest.raises(ValueError, match="INVALID_ARGUMENT"):
        asyncio.run(expected_times(send, Mix(steps=(3,)), repeats=1))


def test_assign_slos_scales_each_request_shapes_expected_time():
    mix = Mix(steps=(2, 5, 9), schedulers=("ddim", "euler"))
    report = Report(mode="open", concurrency=None, rate=1.0, wall_s=1.0)
    report.records = [Record(i, 0.0, 0.1, "OK", 1) for i in (0, 1, 2, 7)]
    expected = {("", 0, 0, 2, "ddim"): 1.0, ("", 0, 0, 5, "euler"): 2.0, ("", 0, 0, 5, "ddim"): 4}
    assign_slos(report, mix, expected, scale=3.0)
    # request 7 is 5 steps, euler; request 2 (9 steps, ddim) has no expected time
    assert [r.slo_s for r in report.records] == [3.0, 6.0, None, 6.0]
    with pytest.raises(ValueError):
        assign_slos(report, mix, expected, scale=0)


@pytest.mark.parametrize("as_target", [False, True])
def test_rate_sweep_runs_one_open_loop_per_rate_with_slos(as_target):
    send, _ = fake_sender(fail_steps=4)
    mix = Mix(steps=(1, 2, 4))
    expected = {("", 0, 0, 1, ""): 0.2, ("", 0, 0, 2, ""): 0.2}  # 4 steps: none (fails anyway)
    ended = []
    target = Target(partial(drive, send)) if as_target else send
    reports = asyncio.run(rate_sweep(target, mix, [50.0, 100.0], requests=9, expected=expected,
                                     scale=5.0, on_report=ended.append))  # fmt: skip
    assert [r.rate for r in reports] == [50.0, 100.0] and ended == reports
    for report in reports:
        summary = report.summary()
        assert summary["mode"] == "open" and summary["requests"] == 9
        assert {r.slo_s for r in report.records} == {1.0, None}
        assert summary["slo_attainment"] == pytest.approx(6 / 9)  # 1 and 2 steps met (0.01s)
        assert summary["goodput_rps"] == pytest.approx(6 / report.wall_s)
    table = format_sweep(reports)
    assert len(table.splitlines()) == 3 and "66.7%" in table
    with pytest.raises(ValueError):
        asyncio.run(rate_sweep(send, mix, [], requests=1, expected=expected))


def test_rate_sweep_measures_the_expected_times_when_not_given():
    send, state = fake_sender()
    reports = asyncio.run(rate_sweep(send, Mix(steps=(1,)), [200.0], requests=4, scale=50))
    assert len(state["sent"]) == 3 + 4  # a warm-up, two repeats, then the load
    assert reports[0].summary()["slo_attainment"] == 1.0


def test_parse_sweep():
    assert parse_sweep("1:4:4") == [1.0, 2.0, 3.0, 4.0]
    assert parse_sweep("0.1:0.3:3") == [0.1, 0.2, 0.3]
    assert parse_sweep("2:2:1") == [2.0]
    for bad in ("", "1:4", "1:4:4:5", "a:4:2", "1:4:2.5", "0:4:2", "-1:4:2", "4:1:2", "1:4:0",
                "1:4:1", "1:inf:3", "nan:1:2"):  # fmt: skip
        with pytest.raises(ValueError, match="sweep"):
            parse_sweep(bad)


def test_the_cli_refuses_a_bad_sweep_or_one_with_another_load(capsys):
    for args in (["--rate-sweep", "1:x:3"], ["--rate-sweep", "1:2:3", "--rate", "2"],
                 ["--slo-scale", "0"]):  # fmt: skip
        with pytest.raises(SystemExit) as exited:
            main(["loadtest", *args])
        assert exited.value.code == 2
    err = capsys.readouterr().err
    assert "A:B:N" in err and "not allowed with argument" in err and "positive" in err


def test_the_cli_sweep_prints_a_line_per_rate_a_table_and_writes_every_report(
    monkeypatch, tmp_path, capsys
):
    """`sdserve loadtest --rate-sweep` against a fake gRPC target (run_loadtest replaced)."""
    send, _ = fake_sender()
    monkeypatch.setattr("sdserve.loadtest.run_loadtest", lambda target, **kw: drive(send, **{
        k: v for k, v in kw.items() if k not in ("application", "credentials", "timeout_s",
                                                 "metadata")}))  # fmt: skip
    out = tmp_path / "sweep.json"
    code = main(["loadtest", "--rate-sweep", "100:200:2", "--requests", "4", "--steps", "1,2",
                 "--width", "64", "--out", str(out), "-q"])  # fmt: skip
    assert code == 0
    printed = capsys.readouterr().out
    assert "default model, width 64, 1 steps, default scheduler" in printed
    assert "SLO" in printed and printed.count("rate 100.00/s") == 1
    assert printed.count("rate 200.00/s") == 1 and "goodput/s" in printed  # the table
    document = json.loads(out.read_text())
    assert [r["summary"]["rate"] for r in document["reports"]] == [100.0, 200.0]
    assert all("slo_attainment" in r["summary"] for r in document["reports"])
    assert document["slo_scale"] == 3.0 and len(document["expected_s"]) == 2
    assert {e["steps"] for e in document["expected_s"]} == {1, 2}


def test_plot_sweep_draws_one_system_or_several(tmp_path):
    from PIL import Image

    from sdserve.loadtest.plot import plot_sweep

    def sweep(slowdown: float) -> list[Report]:
        reports = []
        for rate in (1.0, 2.0, 4.0):
            report = Report(mode="open", concurrency=None, rate=rate, wall_s=5.0)
            report.records = [Record(i, i * 0.2, slowdown * rate * (1 + i % 3), "OK", 1,
                                     slo_s=6.0) for i in range(10)]  # fmt: skip
            reports.append(report)
        return reports

    for reports in (sweep(1.0), {"sdserve": sweep(1.0), "baseline": sweep(2.0)}):
        out = plot_sweep(reports, tmp_path / "sub" / "sweep.png")
        image = Image.open(out)
        assert image.size[0] > 2 * image.size[1]
        assert len(image.convert("RGB").getcolors(maxcolors=1 << 20)) > 50
