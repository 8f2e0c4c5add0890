"""Input images and masks, prepared as diffusers' VaeImageProcessor does for Z-Image (PIL in, tensors out),
and output images converted back. Reading images from files or bytes (formats, pixel budget, header before
pixels) is runtime/validate.py's `probe_image` / `decode_image`."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from ..errors import UserError


def target_size(image: Image.Image, multiple: int) -> tuple[int, int]:
    """(height, width) rounded down to a multiple of `multiple`, as diffusers does."""
    h, w = image.height - image.height % multiple, image.width - image.width % multiple
    if h <= 0 or w <= 0:
        raise UserError(f"image of {image.width}x{image.height} is smaller than {multiple} pixels")
    return h, w


def _resize(image: Image.Image, h: int, w: int) -> Image.Image:
    return image if image.size == (w, h) else image.resize((w, h), resample=Image.LANCZOS)


def preprocess_image(image: Image.Image, multiple: int) -> torch.Tensor:
    """-> (1, 3, H, W) float32 in [-1, 1], H and W rounded down to `multiple` (LANCZOS resize if needed)."""
    h, w = target_size(image, multiple)
    arr = np.asarray(_resize(image.convert("RGB"), h, w)).astype(np.float32) / 255.0
    return torch.from_numpy(arr).permute(2, 0, 1)[None] * 2.0 - 1.0


def preprocess_mask(mask: Image.Image, image: Image.Image, multiple: int) -> torch.Tensor:
    """-> (1, 1, H, W) float32 of 0/1 (1 = repaint), at the image's prepared size."""
    if mask.size != image.size:
        raise UserError(f"the mask is {mask.width}x{mask.height} but the image is {image.width}x{image.height}: "
                        "they must be the same size")
    h, w = target_size(image, multiple)
    arr = np.asarray(_resize(mask, h, w).convert("L")).astype(np.float32) / 255.0  # resize, then gray
    arr = np.where(arr < 0.5, 0.0, 1.0).astype(np.float32)
    return torch.from_numpy(arr)[None, None]


def to_pil(images: torch.Tensor) -> list[Image.Image]:
    """(B, 3, H, W) in [0, 1] -> PIL images, rounding as diffusers' image processor does."""
    arr = (images.float().permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8)
    return [Image.fromarray(a) for a in arr]
