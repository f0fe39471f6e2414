"""Image helpers shared by every loader: the one place that resizes and converts pixels.

Loaders keep images as uint8 (N, C, H, W) until the last step, because that is what the
files hold and what the cache stores (a quarter of the size of float32).
"""

from __future__ import annotations

import numpy as np
from PIL import Image


def resize_rgb(image: Image.Image, size: int) -> np.ndarray:
    """An image as a uint8 (size, size, 3) array: converted to RGB and squashed to a square.

    Squashing (not cropping) keeps the whole object in view; FedBN's Office-Caltech-10
    and DomainNet pipelines resize the same way.
    """
    image.draft("RGB", (size, size))  # JPEGs decode at a reduced scale: much faster for big photos
    return np.asarray(image.convert("RGB").resize((size, size), Image.Resampling.BILINEAR), dtype=np.uint8)


def resize_batch(images: np.ndarray, size: int) -> np.ndarray:
    """Resize uint8 (N, H, W) or (N, H, W, 3) images to ``size`` x ``size`` (bilinear)."""
    resized = [np.asarray(Image.fromarray(image).resize((size, size), Image.Resampling.BILINEAR)) for image in images]
    return np.stack(resized).astype(np.uint8) if resized else np.zeros((0, size, size, *images.shape[3:]), np.uint8)


def to_float(images: np.ndarray) -> np.ndarray:
    """uint8 images (N, C, H, W) as float32 in [0, 1]."""
    return images.astype(np.float32) / np.float32(255.0)


def to_uint8(images: np.ndarray) -> np.ndarray:
    """Float images in [0, 1] as uint8, rounding to the nearest level."""
    return np.clip(np.rint(images * 255.0), 0, 255).astype(np.uint8)


def channels_first(images: np.ndarray) -> np.ndarray:
    """(N, H, W) or (N, H, W, C) to (N, C, H, W), as a contiguous array."""
    if images.ndim == 3:
        return np.ascontiguousarray(images[:, None])
    return np.ascontiguousarray(images.transpose(0, 3, 1, 2))
