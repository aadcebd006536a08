"""The denoiser stage: the U-Net and the denoising loop.

The loop mirrors `StableDiffusionPipeline.__call__` in diffusers (phases 4-7), with one change of
shape: every image is a `Sample` with its own scheduler instance, its own seeded CPU generator and
its own guidance, and one U-Net forward (`unet_step`) covers all running samples, each at its own
timestep. An image therefore does not depend on what it was batched with.

SDXL's U-Net also takes, per row, the second text encoder's pooled embeddings and the size
conditioning (`added_cond_kwargs`, as `StableDiffusionXLPipeline.__call__` phase 7 builds
them): each SDXL sample carries its own (`TextTime`). Likewise each sample carries its request's
LoRA adapters and scales (`Sample.loras`), applied to its rows only (`lora.rows`).
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from sdserve.pipeline import held_cache, lora, models
from sdserve.pipeline.compiled import DEFAULT_BUCKETS, CompiledUNet, OnCompile
from sdserve.pipeline.images import EncodedImage, strength_timesteps
from sdserve.pipeline.lora_layers import LoraLayers
from sdserve.pipeline.precision import resolve_dtype
from sdserve.pipeline.sample import Sample, make_sample
from sdserve.pipeline.schedulers import make_scheduler
from sdserve.pipeline.step import unet_step
from sdserve.pipeline.text_time import TextTime, pooled_width, takes_text_time, time_ids
from sdserve.pipeline.threads import set_threads

if TYPE_CHECKING:
    from sdserve.pipeline.controlnet import Control
    from sdserve.pipeline.lora_adapter import LoraAdapter

logger = logging.getLogger(__name__)


@dataclass(eq=False)
class DenoiseJob:
    """One request: a list of images (samples) that share a prompt and settings.

    Its samples hold the per-row tensors (initial noise, embeddings on the device); they are
    made when the request joins the running batch (`admit`), not when it arrives: a Denoiser
    may hold thousands of waiting requests, and only the running batch needs them. `shape`,
    `images` and `total` are known before."""

    request_id: str
    make_samples: Callable[[], list[Sample]]
    """Makes the samples (once, on admission)."""
    shape: tuple[int, ...]
    """One image's latents, (1, C, h, w): requests of one shape share a forward."""
    images: int
    total: int
    """Steps each image runs."""
    on_event: Callable[[object], None] = lambda event: None
    """Receives the engine's events (sdserve.pipeline.engine)."""
    deadline: float | None = None
    """time.monotonic() value after which the request is dropped."""
    preview_every: int = 0
    """Attach latents to every M-th Step event (0: never)."""
    submitted_at: float = field(default_factory=time.monotonic)
    cancelled: str | None = None
    output: Callable[[torch.Tensor], torch.Tensor] | None = None
    """Turns the samples' latents into the request's (FLUX: unpacks them); None: as they are."""
    request_class: str = "interactive"
    """interactive (a person waits) or bulk (a job): `scheduling` puts interactive first."""
    priority: str = ""
    """A bulk job's priority: high, normal or low ("": normal)."""
    tenant: str = ""
    """Whose request it is (an API key's tenant): tenants take turns within a class."""
    paused_s: float = 0.0
    """Seconds it sat out forwards while running (preempted for interactive requests)."""
    paused_since: float | None = None
    """time.monotonic() when it was paused; None while it takes part in forwards."""
    _samples: list[Sample] | None = field(default=None, repr=False)

    def admit(self) -> None:
        """Makes the samples, as the request joins the running batch."""
        if self._samples is None:
            self._samples = self.make_samples()

    @property
    def samples(self) -> list[Sample]:
        """Its images (made now if not yet admitted: `Denoiser.denoise` and tests)."""
        self.admit()
        return self._samples

    @property
    def steps_done(self) -> int:
        """Steps done (0 before admission)."""
        return self._samples[0].index if self._samples else 0

    @property
    def done(self) -> bool:
        return self._samples is not None and all(s.done for s in self._samples)

    def latents(self) -> torch.Tensor:
        """Its images' latents now, (images, C, h, w): a fresh tensor."""
        latents = torch.cat([s.latents for s in self.samples])
        return self.output(latents) if self.output is not None else latents


def run_alone(job: DenoiseJob, step: Callable[[list[Sample]], None],
              on_step: Callable[[int, int], None] | None = None) -> torch.Tensor:  # fmt: skip
    """Runs one job's whole loop with no engine (`step`: a denoiser's forward over its samples);
    `on_step(steps done, steps in all)` after each. Returns its final latents."""
    while not job.done:
        step(job.samples)
        if on_step is not None:
            on_step(job.samples[0].index, job.total)
    return job.latents()


class Denoiser:
    """Loads `unet/` and `scheduler/` (and reads `vae/config.json` for the latent scale)."""

    def __init__(self, model_dir: str | Path, device: str = "auto", dtype: str = "auto", *,
                 allow_pickle: bool = False):  # fmt: skip
        root = models.check_model_dir(model_dir, ("unet", "scheduler"), allow_pickle=allow_pickle)
        device_ = models.resolve_device(device)
        self._set_parts(
            models.load_unet(
                root, device_, resolve_dtype(dtype, device_), allow_pickle=allow_pickle
            ),  # fmt: skip
            models.load_scheduler_config(root),
            models.vae_scale_factor(models.read_config(root, "vae")),
            models.model_family(root),
        )

    @classmethod
    def from_parts(
        cls, unet, scheduler_config: dict, vae_scale_factor: int, family: str | None = None
    ) -> Denoiser:
        """Wraps an already-loaded U-Net (benchmarks build the parts in memory); `family`
        None: told from the U-Net's config (`models.config_family`)."""
        denoiser = cls.__new__(cls)
        family = family or models.config_family(dict(unet.config))
        denoiser._set_parts(unet, scheduler_config, vae_scale_factor, family)
        return denoiser

    def _set_parts(self, unet, scheduler_config: dict, vae_scale_factor: int, family: str) -> None:
        self.unet = unet
        self.device, self.dtype = unet.device, unet.dtype
        self.forward: CompiledUNet | None = None
        """The compiled plain forward, once `compile` has run (None: eager)."""
        self.scheduler_config = dict(scheduler_config)
        self.vae_scale_factor = vae_scale_factor
        self.family = family
        """The model family: "sd1", "sd2" or "sdxl" (`models.model_family`)."""
        size = self.unet.config.sample_size
        h, w = (size, size) if isinstance(size, int) else size
        self.native_size = (w * self.vae_scale_factor, h * self.vae_scale_factor)
        """(width, height) in pixels the model was trained at."""

    @property
    def prediction_type(self) -> str:
        """What the U-Net predicts: "epsilon" (SD 1.x, SDXL), "v_prediction" (SD 2.x at 768)
        or "sample"; the schedulers read it from the same config."""
        return self.scheduler_config.get("prediction_type", "epsilon")

    def example_inputs(self, rows: int, latent_shape: tuple[int, int, int] | None = None):
        """Random U-Net inputs of `rows` batch rows at `latent_shape` (default: the native
        size's): (x, timesteps, context, added_cond_kwargs), as `unet_step` builds them."""
        config = self.unet.config
        _, h, w = latent_shape or self.latent_shape(*self.native_size)
        x = torch.randn(rows, config.in_channels, h, w).to(self.device, self.dtype)
        context = torch.randn(rows, 77, config.cross_attention_dim).to(self.device, self.dtype)
        t = torch.full((rows,), 500.0, device=self.device)
        added = None
        if takes_text_time(self.unet):
            pooled = torch.randn(rows, pooled_width(self.unet)).to(self.device, self.dtype)
            ids = time_ids(w * self.vae_scale_factor, h * self.vae_scale_factor,
                           dtype=self.dtype, device=self.device)  # fmt: skip
            added = {"text_embeds": pooled, "time_ids": ids.repeat(rows, 1)}
        return x, t, context, added

    @torch.inference_mode()
    def calibration_forward(self, rows: int) -> None:
        """One U-Net forward over `rows` batch rows at the native size, random inputs (for
        timing: `sdserve.pipeline.threads`)."""
        x, t, context, added = self.example_inputs(rows)
        self.unet(x, t, encoder_hidden_states=context, added_cond_kwargs=added)

    @torch.inference_mode()
    def forward_seconds(self, compile_setting: str = "auto") -> float:
        """Seconds of an eager forward of one guided image (2 rows) on a CPU, after a warm-up:
        what `compile: auto` decides by (`compiled.resolve_mode`). 0 where nothing depends on
        it (another setting, or a GPU)."""
        if compile_setting != "auto" or self.device.type != "cpu":
            return 0.0
        self.calibration_forward(2)
        started = time.perf_counter()
        self.calibration_forward(2)
        return time.perf_counter() - started

    def compile(
        self,
        mode: str = "default",
        buckets: Sequence[int] | None = DEFAULT_BUCKETS,
        sizes: Sequence[tuple[int, int]] = (),
        on_compile: OnCompile | None = None,
        threads_for_rows: Callable[[int], int] | None = None,
        max_rows: int = 32,
    ) -> float:
        """Compiles the U-Net's plain forward (`compiled.CompiledUNet`; `buckets` None: one
        dynamic graph for up to `max_rows` rows) and warms it at the native size and each
        (width, height) of `sizes`, each bucket on the threads `threads_for_rows` gives it
        (inductor builds its CPU kernels for the thread count of the moment). Later forwards
        (`denoise`, the engine's `forward`) use it. Returns the seconds it took."""
        self.forward = CompiledUNet(self.unet, mode, buckets, on_compile, max_rows)
        shapes = list(dict.fromkeys(self.latent_shape(w, h)
                                    for w, h in [self.native_size, *sizes]))  # fmt: skip

        def example(rows: int, shape: tuple[int, int, int]) -> tuple:
            if threads_for_rows is not None:
                set_threads(threads_for_rows(rows))
            return self.example_inputs(rows, shape)

        return self.forward.warm_up(shapes, example)

    def latent_shape(self, width: int, height: int) -> tuple[int, int, int]:
        """One image's latents (the U-Net's output channels: a 9-channel inpainting U-Net
        still denoises 4-channel latents)."""
        f = self.vae_scale_factor
        return (self.unet.config.out_channels, height // f, width // f)

    @property
    def inpainting(self) -> bool:
        """A 9-channel inpainting U-Net (latents, mask and masked-image latents as input)."""
        return self.unet.config.in_channels == 9

    def denoise(
        self,
        cond: torch.Tensor,
        uncond: torch.Tensor | None,
        *,
        on_step: Callable[[int, int], None] | None = None,
        **request,
    ) -> torch.Tensor:
        """Runs the whole denoising loop for one request, alone (no engine): the keyword
        arguments are `make_job`'s (width, height, steps, guidance_scale, scheduler, seeds, and
        the optional ones); `on_step` is called with (steps done, steps in all) after every
        U-Net forward.

        Returns:
            Final latents, shape (len(seeds), latent_channels, height // f, width // f).
        """
        return run_alone(self.make_job("solo", cond, uncond, **request), self.step, on_step)

    def step(self, samples: Sequence[Sample]) -> None:
        """One U-Net forward over `samples` (one bucket), compiled where it can be."""
        unet_step(self.unet, samples, self.forward)

    def make_job(
        self,
        request_id: str,
        cond: torch.Tensor,
        uncond: torch.Tensor | None,
        *,
        width: int,
        height: int,
        steps: int,
        guidance_scale: float,
        scheduler: str,
        seeds: Sequence[int],
        pooled: torch.Tensor | None = None,
        uncond_pooled: torch.Tensor | None = None,
        init: EncodedImage | None = None,
        strength: float = 1.0,
        guidance_stop: float = 1.0,
        cache_interval: int = 1,
        cache_levels: int = 0,
        loras: Sequence[tuple[LoraAdapter, float]] = (),
        controls: Sequence[Control] = (),
        **job_kwargs,
    ) -> DenoiseJob:
        """A request's job, whose images (timesteps, initial noise, step kwargs) are prepared
        as diffusers does when the engine admits it (`DenoiseJob.admit`), from an encoded
        init image (and mask) when given; `job_kwargs` go to `DenoiseJob` (on_event,
        deadline, preview_every).

        `cond` is the prompt's embeddings, shape (1, seq_len, hidden); `uncond` the negative
        prompt's, or None when guidance_scale <= 1. Image i starts from its own
        `Generator().manual_seed(seeds[i])`. An SDXL U-Net needs `pooled` (1, projection_dim),
        and `uncond_pooled` with guidance; other U-Nets ignore them. `init` and `strength`:
        image-to-image and inpainting; `guidance_stop`, `cache_interval` and `cache_levels`:
        cheaper steps. `loras`: the request's LoRA adapters (loaded for this U-Net,
        `lora.load_lora`), each with its scale. `controls`: its ControlNet entries
        (`controlnet.Control`; several are a MultiControlNet); a controlled request runs the
        whole U-Net at every step (no DeepCache).

        Raises:
            ValueError: an input the U-Net needs is missing or has the wrong width, or an
                adapter names a module the U-Net does not have.
        """
        if self.inpainting and (init is None or init.mask is None):
            raise ValueError("an inpainting U-Net needs an init image and a mask")
        guided = guidance_scale > 1 and self.unet.config.time_cond_proj_dim is None
        if guided and uncond is None:
            raise ValueError("guidance_scale > 1 needs the negative-prompt embeddings")
        text_time = TextTime.for_unet(self.unet, pooled, uncond_pooled, guided=guided,
                                      width=width, height=height)  # fmt: skip
        for adapter, _ in loras:  # wraps its layers now, so that a misfit fails this request
            LoraLayers.of(self.unet).install(adapter)
        latent_shape = self.latent_shape(width, height)
        if controls:
            cache_interval = 1  # a shallow step would skip the blocks the nets condition
        make_samples = functools.partial(
            self._samples, cond, uncond if guided else None, tuple(seeds),
            guidance_scale=guidance_scale, scheduler_name=scheduler, steps=steps,
            latent_shape=latent_shape, init=init, strength=strength, guidance_stop=guidance_stop,
            cache_interval=cache_interval, cache_levels=cache_levels, text_time=text_time,
            loras=loras, controls=tuple(controls),
        )  # fmt: skip
        total = self._steps_run(scheduler, steps, strength if init is not None else None)
        job = DenoiseJob(request_id, make_samples, (1, *latent_shape), len(seeds), total,
                         **job_kwargs)  # fmt: skip
        lora.hold_while_alive(job, loras)  # the cache keeps its adapters while it lives
        held_cache.hold_while_alive(job, [c.net for c in controls])  # and its ControlNets
        return job

    def _samples(self, cond: torch.Tensor, uncond: torch.Tensor | None, seeds: Sequence[int],
                 **sample_kwargs) -> list[Sample]:  # fmt: skip
        """A request's images (`sample.make_sample`), one per seed, its embeddings moved to
        the U-Net's device and dtype: when the engine admits it."""
        cond = cond.to(self.device, self.dtype)
        uncond = uncond.to(self.device, self.dtype) if uncond is not None else None
        return [
            make_sample(cond=cond, uncond=uncond, seed=seed, scheduler_config=self.scheduler_config,
                        device=self.device, dtype=self.dtype, inpainting_unet=self.inpainting,
                        **sample_kwargs)
            for seed in seeds
        ]  # fmt: skip

    def _steps_run(self, scheduler: str, steps: int, strength: float | None) -> int:
        """Steps an image runs (its scheduler's timesteps, cut by an image input's
        `strength`), from a scheduler of its own on the CPU: no tensor of the request's."""
        probe = make_scheduler(scheduler, self.scheduler_config)
        probe.set_timesteps(steps)
        return len(probe.timesteps if strength is None
                   else strength_timesteps(probe, steps, strength))  # fmt: skip
