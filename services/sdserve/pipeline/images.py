"""Image inputs: the VAE encoder stage, and how an encoded image starts a request's denoising.

Image-to-image and inpainting follow diffusers' `StableDiffusionImg2ImgPipeline` and
`StableDiffusionInpaintPipeline` exactly, split at the stage boundary:

- the VAE encoder (`VaeEncoder.encode`) preprocesses the image (and, for inpainting, the mask
  and the masked image) with diffusers' own `VaeImageProcessor`s and returns each image's
  posterior *moments*, not a sample: the sample needs each image's seeded generator, which only
  the Denoiser holds, so one encoding serves every image of a request;
- the Denoiser (`start_latents`) draws from the generator in the order the pipelines do (the
  image's posterior sample, the noise, then the masked image's posterior sample), noises the
  image latents to the request's first timestep, and keeps what the steps need
  (`ImageConditioning`): the mask and masked-image latents a 9-channel inpainting U-Net takes
  as extra input channels, or the clean image latents and the noise that a 4-channel model's
  inpainting blends back after every step.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers.image_processor import VaeImageProcessor
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
from diffusers.utils.torch_utils import randn_tensor
from PIL import Image

from sdserve.pipeline import models
from sdserve.pipeline.precision import resolve_dtype


@dataclass(frozen=True)
class EncodedImage:
    """What the VAE encoder makes of a request's image inputs."""

    image: torch.Tensor
    """Posterior moments (mean and log-variance, channels concatenated) of the init image,
    shape (1, 2 * latent_channels, h, w)."""
    scaling_factor: float
    """The VAE's latent scale: latents = scaling_factor * posterior sample."""
    masked: torch.Tensor | None = None
    """Inpainting: moments of the init image with the repainted area blacked out."""
    mask: torch.Tensor | None = None
    """Inpainting: the binarized mask at latent size, shape (1, 1, h, w); 1 = repaint."""


def open_rgb(data: bytes) -> Image.Image:
    """PNG or JPEG bytes as an RGB image (an alpha channel is dropped)."""
    return Image.open(io.BytesIO(data)).convert("RGB")


class VaeEncoder:
    """Loads `vae/` of a model folder and encodes image inputs."""

    def __init__(self, model_dir: str | Path, device: str = "auto", dtype: str = "auto", *,
                 allow_pickle: bool = False):  # fmt: skip
        root = models.check_model_dir(model_dir, ("vae",), allow_pickle=allow_pickle)
        self.device = models.resolve_device(device)
        self.dtype = resolve_dtype(dtype, self.device)
        self._set_vae(models.load_vae(root, self.device, self.dtype, allow_pickle=allow_pickle))

    @classmethod
    def from_parts(cls, vae) -> VaeEncoder:
        """Wraps an already-loaded AutoencoderKL."""
        encoder = cls.__new__(cls)
        encoder.device, encoder.dtype = vae.device, vae.dtype
        encoder._set_vae(vae)
        return encoder

    def _set_vae(self, vae) -> None:
        self.vae = vae
        self.scale = models.vae_scale_factor(dict(vae.config))
        # The processors of StableDiffusionInpaintPipeline (Img2Img's image processor is the same).
        self.image_processor = VaeImageProcessor(vae_scale_factor=self.scale)
        self.mask_processor = VaeImageProcessor(
            vae_scale_factor=self.scale,
            do_normalize=False,
            do_binarize=True,
            do_convert_grayscale=True,
        )

    @torch.inference_mode()
    def calibration_forward(self, rows: int = 1) -> None:
        """Encodes `rows` random images at the VAE's native size (for timing)."""
        side = self.vae.config.sample_size
        pixels = torch.rand(rows, self.vae.config.in_channels, side, side) * 2 - 1
        self.vae.encode(pixels.to(self.device, self.dtype))

    @torch.inference_mode()
    def moments(self, pixels: torch.Tensor) -> torch.Tensor:
        """The posterior's moments of (1, 3, H, W) pixels in [-1, 1]."""
        posterior = self.vae.encode(pixels.to(self.device, self.dtype)).latent_dist
        return posterior.parameters

    @torch.inference_mode()
    def encode(self, init_image: bytes, mask_image: bytes = b"") -> EncodedImage:
        """Encodes an init image (PNG or JPEG) and, for inpainting, its mask (white: repaint).
        The sizes are the caller's to check (the image must be a multiple of 8 on each side,
        the mask the image's size)."""
        image = open_rgb(init_image)
        width, height = image.size
        pixels = self.image_processor.preprocess(image, height=height, width=width)
        pixels = pixels.to(dtype=torch.float32)
        encoded = dict(image=self.moments(pixels), scaling_factor=self.vae.config.scaling_factor)
        if mask_image:
            mask = Image.open(io.BytesIO(mask_image))
            mask = self.mask_processor.preprocess(mask, height=height, width=width)
            encoded["masked"] = self.moments(pixels * (mask < 0.5))
            latent_size = (height // self.scale, width // self.scale)
            encoded["mask"] = torch.nn.functional.interpolate(mask, size=latent_size)
        return EncodedImage(**encoded)


@dataclass(eq=False)
class ImageConditioning:
    """What an image-to-image or inpainting sample carries through its steps."""

    mask: torch.Tensor | None = None
    """Inpainting: (1, 1, h, w), 1 = repaint."""
    masked_latents: torch.Tensor | None = None
    """9-channel inpainting: the masked image's latents, an extra U-Net input."""
    image_latents: torch.Tensor | None = None
    """4-channel inpainting: the clean image latents blended back into the kept area."""
    noise: torch.Tensor | None = None
    """4-channel inpainting: the noise that re-noises `image_latents` to each next timestep."""

    @property
    def extra_channels(self) -> list[torch.Tensor]:
        """What goes after the latents in the U-Net's input (9-channel inpainting models)."""
        return [self.mask, self.masked_latents] if self.masked_latents is not None else []


def _sample(moments: torch.Tensor, generator: torch.Generator, scaling_factor: float):
    return scaling_factor * DiagonalGaussianDistribution(moments).sample(generator=generator)


def strength_timesteps(scheduler, steps: int, strength: float) -> torch.Tensor:
    """The image-to-image pipelines' `get_timesteps`: the last `int(steps * strength)` steps."""
    t_start = max(steps - min(int(steps * strength), steps), 0)
    if hasattr(scheduler, "set_begin_index"):
        scheduler.set_begin_index(t_start * scheduler.order)
    return scheduler.timesteps[t_start * scheduler.order :]


def start_latents(
    encoded: EncodedImage,
    *,
    scheduler,
    timesteps: torch.Tensor,
    strength: float,
    generator: torch.Generator,
    inpainting_unet: bool,
    device: torch.device,
    dtype: torch.dtype,
) -> tuple[torch.Tensor, ImageConditioning | None]:
    """The first latents of an image-to-image or inpainting sample, as the two pipelines'
    `prepare_latents` (and `prepare_mask_latents`) make them, and what its steps need.

    Args:
        timesteps: the sample's own timesteps, already cut by strength.
        inpainting_unet: the U-Net takes 9 input channels (latents, mask, masked latents).
    """
    moments = {k: getattr(encoded, k) for k in ("image", "masked")}
    moments = {k: v.to(device, dtype) if v is not None else None for k, v in moments.items()}
    first_t = timesteps[:1]
    sf = encoded.scaling_factor
    if encoded.mask is None:  # image-to-image
        image_latents = _sample(moments["image"], generator, sf)
        noise = randn_tensor(image_latents.shape, generator=generator, device=device, dtype=dtype)
        return scheduler.add_noise(image_latents, noise, first_t), None

    full = strength == 1.0  # inpainting at full strength starts from pure noise
    image_latents = None
    if not inpainting_unet or not full:
        image_latents = _sample(moments["image"], generator, sf)
    shape = (1, *moments["image"].shape[1:])
    shape = (1, shape[1] // 2, *shape[2:])  # moments hold mean and log-variance
    noise = randn_tensor(shape, generator=generator, device=device, dtype=dtype)
    if full:
        latents = noise * scheduler.init_noise_sigma
    else:
        latents = scheduler.add_noise(image_latents, noise, first_t)
    masked_latents = _sample(moments["masked"], generator, sf)  # drawn for both, as diffusers
    mask = encoded.mask.to(device, dtype)
    if inpainting_unet:
        return latents, ImageConditioning(mask=mask, masked_latents=masked_latents)
    return latents, ImageConditioning(mask=mask, image_latents=image_latents, noise=noise)


def blend_kept_area(sample_latents, cond: ImageConditioning, scheduler, next_t) -> torch.Tensor:
    """4-channel inpainting, after a step: the kept area becomes the image's latents noised to
    the next timestep (clean after the last step), as StableDiffusionInpaintPipeline does."""
    proper = cond.image_latents
    if next_t is not None:
        proper = scheduler.add_noise(proper, cond.noise, torch.tensor([next_t]))
    return (1 - cond.mask) * proper + cond.mask * sample_latents
