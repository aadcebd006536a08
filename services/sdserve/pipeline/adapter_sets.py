"""Adapter sets: which requests may share a U-Net forward under `engine.lora_policy`.

A request's adapter set is its LoRA adapters, each with its scale, and its ControlNets (the
nets, by identity; a control's image, scale and window are per row in any case).

- `mixed` (sdserve's default): a forward holds rows of every set; each row gets its own
  adapters (`lora.rows`) and its own nets' residuals (`controlnet.residuals`).
- `one_set`: a forward holds the rows of one set only, the sets of the running requests taking
  turns forward by forward, as servers that bind one LoRA adapter or one ControlNet (or one
  MultiControlNet) to a batch do. It exists to measure what mixing buys
  (bench/bench_lora.py, bench/bench_controlnet.py).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from sdserve.pipeline.denoise import DenoiseJob

POLICIES = ("mixed", "one_set")


def adapter_set(job: DenoiseJob) -> tuple:
    """The key of a running job's adapter set: ((id(adapter), scale), ...), (id(net), ...)."""
    sample = job.samples[0]
    loras = tuple((id(adapter), scale) for adapter, scale in sample.loras)
    return loras, tuple(id(control.net) for control in sample.controls)


def one_set(jobs: list[DenoiseJob], turn: int) -> list[DenoiseJob]:
    """The jobs of one adapter set: the `turn`-th (modulo their number) of the sets of `jobs`,
    in the order the jobs hold them."""
    sets = list(dict.fromkeys(adapter_set(job) for job in jobs))
    chosen = sets[turn % len(sets)]
    return [job for job in jobs if adapter_set(job) == chosen]
