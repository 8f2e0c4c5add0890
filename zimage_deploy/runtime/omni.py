"""Edit / Omni host side: prompt segments and condition-image preparation, reproducing diffusers'
`ZImageOmniPipeline` (the sequence layout the omni graphs take: models/omni.py)."""

from __future__ import annotations

import math

import numpy as np
import torch
from PIL import Image

from ..errors import UserError


def prompt_segments(prompt: str, n_images: int) -> list[str]:
    """The texts the Omni pipeline tokenizes separately, one per caption segment."""
    if n_images == 0:
        return ["<|im_start|>user\n" + prompt + "<|im_end|>\n<|im_start|>assistant\n"]
    segs = ["<|im_start|>user\n<|vision_start|>"]
    segs += ["<|vision_end|><|vision_start|>"] * (n_images - 1)
    segs += ["<|vision_end|>" + prompt + "<|im_end|>\n<|im_start|>assistant\n<|vision_start|>"]
    segs += ["<|vision_end|><|im_end|>"]
    return segs


# -- condition images (diffusers' Flux2ImageProcessor rules) -------------------------------------------------
def check_condition_image(image: Image.Image) -> None:
    w, h = image.size
    if w < 64 or h < 64:
        raise UserError(f"condition image too small: {w}x{h}; both sides must be at least 64 px")
    if max(w / h, h / w) > 8:
        raise UserError(f"condition image aspect ratio too extreme: {w}x{h} (at most 8:1)")


def resize_to_area(image: Image.Image, area: int) -> Image.Image:
    w, h = image.size
    scale = math.sqrt(area / (w * h))
    return image.resize((int(w * scale), int(h * scale)), Image.Resampling.LANCZOS)


def _fit(image: Image.Image, multiple: int, height: int | None, width: int | None):
    """-> (the image scaled down to 1024^2 px, or the requested output area, when larger; that image
    center-cropped to a multiple of `multiple`)."""
    if image.width * image.height > 1024 * 1024:
        image = resize_to_area(image, height * width if height and width else 1024 * 1024)
    w, h = (image.width // multiple) * multiple, (image.height // multiple) * multiple
    left, top = (image.width - w) // 2, (image.height - h) // 2
    return image, image.crop((left, top, left + w, top + h))


def prepare_condition(image: Image.Image, multiple: int, height: int | None, width: int | None):
    """-> (image for SigLIP, VAE input (1, 3, H, W) in [-1, 1], (H, W)). Large images are scaled down to
    1024^2 px (or the requested output area), then center-cropped to a multiple of `multiple`."""
    check_condition_image(image)
    image, cropped = _fit(image, multiple, height, width)
    arr = np.asarray(cropped.convert("RGB")).astype(np.float32) / 255.0
    return image, torch.from_numpy(arr).permute(2, 0, 1)[None] * 2.0 - 1.0, cropped.size[::-1]


def prepare_mask(mask: Image.Image, image: Image.Image, multiple: int, height: int | None,
                 width: int | None) -> torch.Tensor:
    """An Edit mask (white = change) for the first condition image -> (1, 1, H, W) of 0/1: resized and cropped
    as that image is (prepare_condition), then thresholded at 50 % gray, as runtime/images.py preprocess_mask
    does for inpainting."""
    if mask.size != image.size:
        raise UserError(f"the mask is {mask.width}x{mask.height} but the first condition image is "
                        f"{image.width}x{image.height}: they must be the same size")
    _, cropped = _fit(mask.convert("L"), multiple, height, width)
    arr = np.where(np.asarray(cropped).astype(np.float32) / 255.0 < 0.5, 0.0, 1.0).astype(np.float32)
    return torch.from_numpy(arr)[None, None]
