"""The denoiser stage of a diffusion transformer (SD3, FLUX): `TransformerDenoiser`.

It is the U-Net `Denoiser`'s counterpart for the flow-matching families: the same jobs
(`DenoiseJob`) in the same engine, whose forwards it runs (`step`, `dit.transformer_step`).
A job's bucket is its latent shape and its prompt tokens' length: the transformer attends over
image and text tokens jointly, so rows of one forward need both equal.

What this version leaves out on these families (the request path refuses each by name):
image inputs, LoRA adapters, DeepCache and ControlNets, and `torch.compile`.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from sdserve.pipeline import dit, models
from sdserve.pipeline.denoise import DenoiseJob, Denoiser, run_alone
from sdserve.pipeline.precision import resolve_dtype
from sdserve.pipeline.sample import DitConditioning, Sample


def denoiser_part(path: str | Path, device: str = "auto", dtype: str = "auto", *,
                  allow_pickle: bool = False):  # fmt: skip
    """The denoiser of the model at `path`: a `TransformerDenoiser` (SD3, FLUX) or a U-Net
    `Denoiser`."""
    if (Path(path) / "transformer").is_dir():
        return TransformerDenoiser(path, device, dtype, allow_pickle=allow_pickle)
    return Denoiser(path, device, dtype, allow_pickle=allow_pickle)


def transformer_class(family: str):
    """The diffusers class of a family's `transformer/`."""
    from diffusers import FluxTransformer2DModel, SD3Transformer2DModel

    return {"sd3": SD3Transformer2DModel, "flux": FluxTransformer2DModel}[family]


class TransformerDenoiser:
    """Loads `transformer/` and `scheduler/` of an SD3 or FLUX folder (and reads
    `vae/config.json` for the latent scale and the native size)."""

    forward = None
    """No compiled forward in this version: transformers run eagerly."""

    def __init__(self, model_dir: str | Path, device: str = "auto", dtype: str = "auto", *,
                 allow_pickle: bool = False):  # fmt: skip
        root = models.check_model_dir(model_dir, ("transformer", "scheduler"),
                                      allow_pickle=allow_pickle)  # fmt: skip
        family = models.model_family(root)
        device_ = models.resolve_device(device)
        transformer = models.load_part(transformer_class(family), root, "transformer", device_,
                                       resolve_dtype(dtype, device_), allow_pickle)  # fmt: skip
        self._set_parts(transformer, models.load_scheduler_config(root),
                        models.read_config(root, "vae"), family)  # fmt: skip

    @classmethod
    def from_parts(cls, transformer, scheduler_config: dict, vae_config: dict,
                   family: str) -> TransformerDenoiser:  # fmt: skip
        """Wraps an already-loaded transformer (benchmarks build the parts in memory)."""
        denoiser = cls.__new__(cls)
        denoiser._set_parts(transformer, scheduler_config, dict(vae_config), family)
        return denoiser

    def _set_parts(self, transformer, scheduler_config: dict, vae_config: dict,
                   family: str) -> None:  # fmt: skip
        self.transformer = transformer
        self.device, self.dtype = transformer.device, transformer.dtype
        self.family = family
        """"sd3" or "flux"."""
        self.scheduler_config = dict(scheduler_config)
        self.vae_scale_factor = models.vae_scale_factor(vae_config)
        self.latent_channels = vae_config["latent_channels"]
        size = vae_config.get("sample_size", 1024)
        size = size if isinstance(size, int) else size[0]
        self.native_size = (size, size)
        """(width, height) in pixels: the VAE's sample size (1024 for SD 3.5 and FLUX.1)."""

    prediction_type = "flow"
    """What the transformer predicts: the flow-matching velocity."""
    inpainting = False

    @property
    def in_channels(self) -> int:
        return self.transformer.config.in_channels

    @property
    def size_multiple(self) -> int:
        """Image sides must be multiples of this: 2 latent cells (SD3's patches, FLUX's 2x2
        packing) of `vae_scale_factor` pixels."""
        return 2 * self.vae_scale_factor

    def step(self, samples: Sequence[Sample]) -> None:
        """One forward over `samples` (one bucket): the engine's step."""
        dit.transformer_step(self.transformer, self.family, samples)

    def latent_size(self, width: int, height: int) -> tuple[int, int]:
        f = self.vae_scale_factor
        return (height // f, width // f)

    def make_job(
        self,
        request_id: str,
        cond: torch.Tensor | None,
        uncond: torch.Tensor | None,
        *,
        width: int,
        height: int,
        steps: int,
        guidance_scale: float,
        seeds: Sequence[int],
        pooled: torch.Tensor,
        uncond_pooled: torch.Tensor | None = None,
        t5_cond: torch.Tensor,
        t5_uncond: torch.Tensor | None = None,
        true_cfg_scale: float = 1.0,
        shift: float = 0.0,
        guidance_stop: float = 1.0,
        scheduler: str = "flow_euler",
        **job_kwargs,
    ) -> DenoiseJob:
        """A request's job (its images made when the engine admits it).

        `cond`/`uncond`: SD3's CLIP tokens (1, 77, hl + hg) of the prompt and the negative
        prompt (None for FLUX); `t5_cond`/`t5_uncond` their T5 tokens (1, L, d); `pooled` and
        `uncond_pooled` the pooled embeddings. SD3 guides with `guidance_scale`; FLUX embeds
        `guidance_scale` (a guidance-distilled model) and guides with `true_cfg_scale`.
        `shift` > 0 overrides the model's sigma shift. `job_kwargs` go to `DenoiseJob`.

        Raises:
            ValueError: guidance without the negative prompt's embeddings, or a size that is
                not a multiple of `size_multiple`.
        """
        if width % self.size_multiple or height % self.size_multiple:
            raise ValueError(f"width and height must be multiples of {self.size_multiple}")
        cfg = true_cfg_scale if self.family == "flux" else guidance_scale
        guided = cfg > 1
        if guided and (t5_uncond is None or uncond_pooled is None):
            raise ValueError("guidance needs the negative prompt's embeddings")
        embedded = None
        if self.family == "flux" and self.transformer.config.guidance_embeds:
            embedded = float(guidance_scale)
        latent_size = self.latent_size(width, height)
        tokens = dit.prompt_tokens(self.family, cond, t5_cond)
        make_samples = functools.partial(
            self._samples, tokens, dit.prompt_tokens(self.family, uncond, t5_uncond)
            if guided else None, tuple(seeds), cfg_scale=cfg, pooled=pooled,
            uncond_pooled=uncond_pooled if guided else None, guidance=embedded,
            latent_size=latent_size, steps=steps, shift=shift, guidance_stop=guidance_stop,
        )  # fmt: skip
        h, w = latent_size
        shape = (1, self.latent_channels, h, w, tokens.shape[1])  # latents and text length
        output: Callable | None = None
        if self.family == "flux":
            output = functools.partial(dit.unpack, latent_size=latent_size)
        return DenoiseJob(request_id, make_samples, shape, len(seeds), steps, output=output,
                          **job_kwargs)  # fmt: skip

    def _samples(self, cond: torch.Tensor, uncond: torch.Tensor | None, seeds: Sequence[int], *,
                 pooled: torch.Tensor, uncond_pooled: torch.Tensor | None, guidance,
                 latent_size: tuple[int, int], **sample_kwargs) -> list[Sample]:  # fmt: skip
        """A request's images, its embeddings moved to the transformer's device and dtype."""

        def on_device(t: torch.Tensor | None) -> torch.Tensor | None:
            return t.to(self.device, self.dtype) if t is not None else None

        conditioning = DitConditioning(on_device(pooled), on_device(uncond_pooled), guidance,
                                       latent_size)  # fmt: skip
        return [
            dit.make_dit_sample(
                family=self.family, cond=on_device(cond), uncond=on_device(uncond), seed=seed,
                conditioning=conditioning, scheduler_config=self.scheduler_config,
                latent_channels=self.latent_channels,
                patch_size=getattr(self.transformer.config, "patch_size", 1), device=self.device,
                dtype=self.dtype, **sample_kwargs,
            )
            for seed in seeds
        ]  # fmt: skip

    def denoise(self, cond, uncond, *, on_step=None, **request) -> torch.Tensor:
        """Runs one request's whole loop alone (no engine): `make_job`'s arguments. Returns
        the final latents, (len(seeds), latent_channels, h, w) (FLUX's unpacked)."""
        return run_alone(self.make_job("solo", cond, uncond, **request), self.step, on_step)

    @torch.inference_mode()
    def calibration_forward(self, rows: int) -> None:
        """One forward over `rows` rows at the native size with random inputs, 256 text
        tokens (for timing: `sdserve.pipeline.threads`)."""
        config = self.transformer.config
        h, w = self.latent_size(*self.native_size)
        on = {"device": self.device, "dtype": self.dtype}
        context = torch.randn(rows, 256, config.joint_attention_dim, **on)
        pooled = torch.randn(rows, config.pooled_projection_dim, **on)
        t = torch.full((rows,), 500.0, device=self.device)
        if self.family == "flux":
            x = dit.pack(torch.randn(rows, self.latent_channels, h, w, **on))
            guidance = torch.full((rows,), 3.5, device=self.device)
            self.transformer(hidden_states=x, timestep=t / 1000,
                             guidance=guidance if config.guidance_embeds else None,
                             pooled_projections=pooled, encoder_hidden_states=context,
                             img_ids=dit.image_ids((h, w), self.device, self.dtype),
                             txt_ids=torch.zeros(256, 3, **on))  # fmt: skip
        else:
            x = torch.randn(rows, self.latent_channels, h, w, **on)
            self.transformer(hidden_states=x, timestep=t, encoder_hidden_states=context,
                             pooled_projections=pooled)  # fmt: skip

    def forward_seconds(self, compile_setting: str = "auto") -> float:
        """0: nothing depends on it (transformers are not compiled in this version)."""
        return 0.0
