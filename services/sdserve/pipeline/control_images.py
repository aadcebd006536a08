"""Control images as the request path prepares them for a ControlNet: decoded, preprocessed
(Canny edges, so a client may send a photo), and resized to the output size.

PIL, NumPy and OpenCV only (no torch): the ingress runs it on a worker thread before the
request reaches the Denoiser, which turns the pixels into the net's input
(`controlnet.prepare_image`, whose resize then has nothing left to do).
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

PREPROCESSORS = ("", "canny")
"""What `Control.preprocess` may name: "" (the image as it is) or "canny"."""
CANNY_LOW = 100.0
CANNY_HIGH = 200.0
"""The default hysteresis thresholds of `canny` (as diffusers' ControlNet examples use)."""


def canny(image: Image.Image, low: float = CANNY_LOW, high: float = CANNY_HIGH) -> Image.Image:
    """OpenCV's Canny edges of the image's grayscale (`cv2.Canny(gray, low, high)`), as a
    3-channel RGB image: white edges (255) on black, the image's size."""
    import cv2  # imported on first use: 0.1 s that requests without a preprocessor never pay

    gray = np.asarray(image.convert("L"))
    edges = cv2.Canny(gray, low, high)
    return Image.fromarray(np.repeat(edges[:, :, None], 3, axis=2), mode="RGB")


def control_pixels(data: bytes, width: int, height: int, preprocess: str = "",
                   low: float = CANNY_LOW, high: float = CANNY_HIGH) -> bytes:  # fmt: skip
    """A control image (PNG or JPEG bytes) preprocessed, converted to RGB and resized to
    width x height (Lanczos, as diffusers' `VaeImageProcessor` resizes control images): uint8
    RGB bytes of shape (height, width, 3), C order.

    Raises:
        ValueError: an unknown `preprocess`.
    """
    if preprocess not in PREPROCESSORS:
        raise ValueError(f"unknown preprocess {preprocess!r}; choose one of {PREPROCESSORS}")
    with Image.open(io.BytesIO(data)) as opened:
        image = opened.convert("RGB")
    if preprocess == "canny":
        image = canny(image, low, high)
    if image.size != (width, height):
        image = image.resize((width, height), resample=Image.Resampling.LANCZOS)
    return np.ascontiguousarray(np.asarray(image, dtype=np.uint8)).tobytes()


def from_pixels(pixels: bytes, width: int, height: int) -> Image.Image:
    """The RGB image of `control_pixels`' bytes."""
    array = np.frombuffer(pixels, dtype=np.uint8)
    if array.size != width * height * 3:
        raise ValueError(f"{array.size} bytes of control pixels for a {width}x{height} image")
    return Image.fromarray(array.reshape(height, width, 3), mode="RGB")
