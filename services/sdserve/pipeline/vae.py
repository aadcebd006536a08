"""The VAE-decoder stage: latents -> RGB pixels -> PNG.

Mirrors the end of `StableDiffusionPipeline.__call__` and `VaeImageProcessor.postprocess`:
`vae.decode(latents / scaling_factor)`, then `(x / 2 + 0.5).clamp(0, 1)`, then
`(x * 255).round()` to uint8. For SDXL, the end of `StableDiffusionXLPipeline.__call__`: a
float16 VAE with `force_upcast` decodes in float32, and latents are denormalized with the
VAE's `latents_mean` and `latents_std` when its config has them.
"""

from __future__ import annotations

import copy
import io
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from sdserve.pipeline import models
from sdserve.pipeline.precision import resolve_dtype


class VaeDecoder:
    """Loads `vae/` of a model folder."""

    def __init__(self, model_dir: str | Path, device: str = "auto", dtype: str = "auto", *,
                 allow_pickle: bool = False):  # fmt: skip
        root = models.check_model_dir(model_dir, ("vae",), allow_pickle=allow_pickle)
        self.device = models.resolve_device(device)
        vae = models.load_vae(root, self.device, resolve_dtype(dtype, self.device),
                               allow_pickle=allow_pickle)  # fmt: skip
        if models.model_family(root) == "sdxl" and _needs_upcast(vae):
            vae = vae.to(torch.float32)  # diffusers' upcast: the same fp16 weights, in fp32
        self.vae, self.dtype = vae, vae.dtype

    @classmethod
    def from_parts(cls, vae, *, upcast: bool = False) -> VaeDecoder:
        """Wraps an already-loaded AutoencoderKL (benchmarks build the parts in memory).

        `upcast` (SDXL): a float16 VAE with `force_upcast` decodes with a float32 copy, as
        `StableDiffusionXLPipeline` does."""
        if upcast and _needs_upcast(vae):
            vae = copy.deepcopy(vae).to(torch.float32)
        decoder = cls.__new__(cls)
        decoder.vae, decoder.device, decoder.dtype = vae, vae.device, vae.dtype
        return decoder

    def _unscale(self, latents: torch.Tensor) -> torch.Tensor:
        """The VAE's input: `latents * latents_std / scaling_factor + latents_mean` when its
        config has a mean and std, else `latents / scaling_factor (+ shift_factor)`: SD3's and
        FLUX's 16-channel VAEs shift as well as scale."""
        config = self.vae.config
        mean, std = getattr(config, "latents_mean", None), getattr(config, "latents_std", None)
        if mean is None or std is None:
            shift = getattr(config, "shift_factor", None)
            return latents / config.scaling_factor + (shift if shift is not None else 0.0)
        channels = latents.shape[1]
        mean = torch.tensor(mean).view(1, channels, 1, 1).to(latents.device, latents.dtype)
        std = torch.tensor(std).view(1, channels, 1, 1).to(latents.device, latents.dtype)
        return latents * std / config.scaling_factor + mean

    @torch.inference_mode()
    def decode(self, latents: torch.Tensor) -> np.ndarray:
        """Decodes latents to pixels.

        Args:
            latents: shape (batch, latent_channels, h, w), as the denoiser returns them.

        Returns:
            `np.ndarray` of dtype uint8 and shape (batch, h * f, w * f, 3).
        """
        latents = self._unscale(latents.to(self.device, self.dtype))
        image = self.vae.decode(latents, return_dict=False)[0]
        image = (image / 2 + 0.5).clamp(0, 1)
        image = image.cpu().permute(0, 2, 3, 1).float().numpy()
        return (image * 255).round().astype("uint8")

    @torch.inference_mode()
    def calibration_forward(self, rows: int = 1) -> None:
        """Decodes `rows` random latents at the VAE's native size (for timing)."""
        config = self.vae.config
        side = config.sample_size // 2 ** (len(config.block_out_channels) - 1)
        latents = torch.randn(rows, config.latent_channels, side, side)
        self.vae.decode(latents.to(self.device, self.dtype), return_dict=False)

    def decode_png(self, latents: torch.Tensor, parameters: Sequence[str] = ()) -> list[bytes]:
        """Decodes and PNG-encodes; `parameters[i]` goes into image i's `parameters` chunk."""
        pixels = self.decode(latents)
        texts = list(parameters) or [""] * len(pixels)
        return [to_png(p, t) for p, t in zip(pixels, texts, strict=True)]


def _needs_upcast(vae) -> bool:
    """Where `StableDiffusionXLPipeline` decodes in float32: a float16 VAE with `force_upcast`
    (SDXL's own VAE overflows in float16)."""
    return vae.dtype == torch.float16 and bool(getattr(vae.config, "force_upcast", False))


def to_png(pixels: np.ndarray, parameters: str = "") -> bytes:
    """PNG-encodes an (h, w, 3) uint8 array, with a `parameters` text chunk when given (the
    convention of AUTOMATIC1111 and other SD tools, read by their "PNG info" tabs)."""
    info = PngInfo()
    if parameters:
        info.add_text("parameters", parameters)
    buf = io.BytesIO()
    Image.fromarray(pixels, "RGB").save(buf, format="PNG", pnginfo=info, compress_level=4)
    return buf.getvalue()


# SD 1.x latent channels -> RGB, a least-squares fit used by ComfyUI and others for previews.
LATENT_RGB_FACTORS = torch.tensor(
    [
        [0.3512, 0.2297, 0.3227],
        [0.3250, 0.4974, 0.2350],
        [-0.2829, 0.1762, 0.2721],
        [-0.2120, -0.2616, -0.7177],
    ]
)


def preview_pixels(latents: torch.Tensor, width: int, height: int) -> np.ndarray:
    """A cheap RGB approximation of latents, without the VAE: a fixed linear map per latent
    cell, upsampled to (height, width). Returns uint8 of shape (batch, height, width, 3)."""
    latents = latents.detach().float().cpu()
    rgb = torch.einsum("bchw,cr->brhw", latents[:, :4], LATENT_RGB_FACTORS)
    rgb = torch.nn.functional.interpolate(rgb, size=(height, width), mode="bilinear")
    rgb = ((rgb + 1) / 2).clamp(0, 1).permute(0, 2, 3, 1).numpy()
    return (rgb * 255).round().astype("uint8")
