"""torch_threads: auto picks, per batch size, whichever thread count ran the forward faster."""

from __future__ import annotations

import time

import torch
from helpers import EAGER

from sdserve.pipeline import threads
from sdserve.pipeline.threads import ThreadPlan, measure_plan


def test_short_forwards_run_on_one_thread_long_ones_on_every_core(monkeypatch):
    monkeypatch.setattr(threads, "available_cores", lambda: 2)
    monkeypatch.setattr(threads, "BIG_S", 0.02)
    timed = []

    def forward(rows: int) -> None:  # 2 rows are quick, 32 rows take long
        timed.append((torch.get_num_threads(), rows))
        time.sleep(0.001 if rows == 2 else 0.03)

    before = torch.get_num_threads()
    try:
        plan = measure_plan(forward, small_rows=2, large_rows=32)
        assert plan == ThreadPlan(small=1, large=2, threshold_rows=17)
        assert [plan.threads_for(r) for r in (2, 17, 18, 32)] == [1, 1, 2, 2]
        assert {threads for threads, _ in timed} == {2}  # timed on every core only
        assert torch.get_num_threads() == 1  # left at the small batch's choice
    finally:
        torch.set_num_threads(before)


def test_one_core_is_one_thread(monkeypatch):
    monkeypatch.setattr(threads, "available_cores", lambda: 1)
    assert measure_plan(lambda rows: None, 1, 8) == ThreadPlan(1, 1, 4)


def test_a_real_stage_measures_its_plan(tiny_model):
    """The engine of a Denoiser service switches threads by rows as measured."""
    from sdserve.config import ModelConfig, SdserveConfig
    from sdserve.metrics import StatsLogger
    from sdserve.stages.denoiser import DenoiserService

    config = SdserveConfig(model=ModelConfig(path=str(tiny_model)), **EAGER)
    service = DenoiserService.from_config(config, StatsLogger())
    try:
        assert service.engine.threads_for_rows is not None
        assert service.engine.threads_for_rows(2) in (1, threads.available_cores())
    finally:
        service.close()
        service.torch.close()
