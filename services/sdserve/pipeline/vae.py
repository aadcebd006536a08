"""The VAE-decoder stage: latents -> RGB pixels -> PNG.

Mirrors the end of `StableDiffusionPipeline.__call__` and `VaeImageProcessor.postprocess`:
`vae.decode(latents / scaling_factor)`, then `(x / 2 + 0.5).clamp(0, 1)`, then
`(x * 255).round()` to uint8.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from sdserve.pipeline import models


class VaeDecoder:
    """Loads `vae/` of a model folder."""

    def __init__(self, model_dir: str | Path, device: str = "auto", dtype: str = "auto"):
        root = models.check_model_dir(model_dir, ("vae",))
        self.device = models.resolve_device(device)
        self.dtype = models.resolve_dtype(dtype, self.device)
        self.vae = models.load_vae(root, self.device, self.dtype)

    @classmethod
    def from_parts(cls, vae) -> VaeDecoder:
        """Wraps an already-loaded AutoencoderKL (benchmarks build the parts in memory)."""
        decoder = cls.__new__(cls)
        decoder.vae, decoder.device, decoder.dtype = vae, vae.device, vae.dtype
        return decoder

    @torch.inference_mode()
    def decode(self, latents: torch.Tensor) -> np.ndarray:
        """Decodes latents to pixels.

        Args:
            latents: shape (batch, latent_channels, h, w), as the denoiser returns them.

        Returns:
            `np.ndarray` of dtype uint8 and shape (batch, h * f, w * f, 3).
        """
        latents = latents.to(self.device, self.dtype) / self.vae.config.scaling_factor
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
