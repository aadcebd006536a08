"""How many CPU threads torch should use for a stage's forwards, measured when the stage loads.

On a CPU, more intra-op threads help large convolutions and hurt small ones: measured on this
project's 2-core machine, the built-in model's U-Net ran a lone request 16% slower on 2 threads
than on 1, while SD 1.5's U-Net and VAE run about 1.8x faster on 2. Several replicas with
every core each also fight over the cores (the built-in model served half as many images per
second with 2 threads in every stage). So `torch_threads: auto` times the stage's own forward
on every core (the faster of two, after a warm-up), at a small and at a large batch: a forward
of BIG_S or more keeps every core, a shorter one runs on one thread (`ThreadPlan`); the
Denoiser's engine sets the threads before each forward from its number of batch rows. The
bound is far from both kinds of model on purpose (the built-in model's largest batch takes
about 0.05 s, SD 1.5's U-Net several seconds): replicas calibrate while their neighbours load,
and a bound near either would flip with the noise. Timing one thread against every core and
keeping the faster was tried first, and its choice did flip between runs here. Measured again
in serving (16 clients, the built-in model's compiled bf16 U-Net): one thread ran a full batch
step in 124 ms, two in 156 ms, because at that load Ray's proxy, the ingress, the other
stages and the clients keep the second core busy, and OpenMP threads that wait at a barrier
for a descheduled sibling stall.
On a GPU none of this matters and nothing is measured.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

logger = logging.getLogger(__name__)

BIG_S = 1.0
"""A forward that takes this long on every core is big enough to keep every core."""


@dataclass(frozen=True)
class ThreadPlan:
    """Threads per forward, by the number of batch rows: `small` up to `threshold_rows` rows,
    `large` above."""

    small: int
    large: int
    threshold_rows: int

    def threads_for(self, rows: int) -> int:
        return self.small if rows <= self.threshold_rows else self.large

    @classmethod
    def fixed(cls, threads: int) -> ThreadPlan:
        return cls(threads, threads, 0)


def set_threads(threads: int) -> None:
    """Sets torch's intra-op threads of the calling thread, if they differ."""
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)


def available_cores() -> int:
    """CPU cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def _seconds(forward: Callable[[], None], threads: int, repeats: int = 2) -> float:
    torch.set_num_threads(threads)
    forward()  # warm-up: allocator, kernels, the thread pool itself
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        forward()
        best = min(best, time.perf_counter() - started)
    return best


def threads_for(forward: Callable[[], None], cores: int) -> int:
    """`cores` when `forward` takes BIG_S or more on every core, else 1."""
    if cores <= 1:
        return 1
    return cores if _seconds(forward, cores) >= BIG_S else 1


def measure_plan(forward: Callable[[int], None], small_rows: int, large_rows: int) -> ThreadPlan:
    """Measures `forward(rows)` at a small and a large batch (call it on the stage's torch
    thread); leaves torch set to the small batch's choice."""
    cores = available_cores()
    small = threads_for(lambda: forward(small_rows), cores)
    large = small if small == cores else threads_for(lambda: forward(large_rows), cores)
    torch.set_num_threads(small)
    plan = ThreadPlan(small, large, threshold_rows=(small_rows + large_rows) // 2)
    logger.info("torch threads: %d up to %d batch rows, %d above (of %d cores)", plan.small,
                plan.threshold_rows, plan.large, cores)  # fmt: skip
    return plan
