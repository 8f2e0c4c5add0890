"""Input images and masks, prepared as diffusers' VaeImageProcessor does for Z-Image (PIL in, tensors out),
and output images converted back. Reading images from files or bytes (formats, pixel budget, header before
pixels, EXIF orientation) is runtime/validate.py's `probe_image` / `decode_image`.

Every input is taken as the picture a person sees (`visible`): 16-bit gray (PNG `I;16`, `I`) scaled to 8 bits,
float gray (`F`, values in [0, 1]) too, palettes expanded, CMYK / YCbCr / LAB / HSV converted, and transparency
(an alpha channel, a palette's transparent entries, PNG's transparent colour) composited onto white (`BACKGROUND`),
as a viewer shows it on a white page. diffusers' `convert("RGB")` instead turns 16-bit gray white (clipped) and
drops alpha, showing whatever colour the transparent pixels hold."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from ..errors import UserError


BACKGROUND = 255  # transparent pixels composite onto white
GRAY16 = ("I;16", "I;16L", "I;16B", "I;16N", "I")  # 16-bit gray as PIL opens it (PNG); "I" taken as 0..65535


def to_8bit(image: Image.Image) -> Image.Image:
    """The same picture in 8-bit "L", "LA", "RGB" or "RGBA" (transparency kept as alpha: the server reads an
    OpenAI mask's alpha). Images already in "L" or "RGB" without a transparent colour are returned as they are."""
    mode, transparency = image.mode, image.info.get("transparency")
    if mode in ("L", "RGB"):
        return image if transparency is None else image.convert(mode + "A")
    if mode in ("LA", "RGBA"):
        return image
    if mode in GRAY16 or mode == "F":
        arr = np.asarray(image).astype(np.float64)
        scaled = arr * 255.0 if mode == "F" else arr / 257.0  # 65535 -> 255, and 257 * v -> v exactly
        gray = Image.fromarray(np.clip(np.rint(scaled), 0, 255).astype(np.uint8), "L")
        if isinstance(transparency, int) and mode != "F":  # a 16-bit PNG's transparent gray value
            gray.putalpha(Image.fromarray(np.where(arr == transparency, 0, 255).astype(np.uint8), "L"))
        return gray
    if mode in ("P", "PA"):
        return image.convert("RGBA" if transparency is not None or mode == "PA" else "RGB")
    if mode == "1":
        return image.convert("L")
    if mode in ("La", "RGBa"):  # premultiplied alpha
        return image.convert(mode[:-1] + "A")
    return image.convert("RGB")  # CMYK, YCbCr, LAB, HSV, RGBX


def visible(image: Image.Image) -> Image.Image:
    """The picture a person sees, 8-bit: "L" for gray sources, else "RGB"; transparency composited onto white."""
    image = to_8bit(image)
    if image.mode not in ("LA", "RGBA"):
        return image
    white = Image.new("RGBA", image.size, (BACKGROUND,) * 4)
    return Image.alpha_composite(white, image.convert("RGBA")).convert(image.mode[:-1])


def to_rgb(image: Image.Image) -> Image.Image:
    """`visible` as 8-bit RGB."""
    image = visible(image)
    return image if image.mode == "RGB" else image.convert("RGB")


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
    arr = np.asarray(_resize(to_rgb(image), h, w)).astype(np.float32) / 255.0
    return torch.from_numpy(arr).permute(2, 0, 1)[None] * 2.0 - 1.0


def preprocess_mask(mask: Image.Image, image: Image.Image, multiple: int) -> torch.Tensor:
    """-> (1, 1, H, W) float32 of 0/1 (1 = repaint), at the image's prepared size."""
    if mask.size != image.size:
        raise UserError(f"the mask is {mask.width}x{mask.height} but the image is {image.width}x{image.height}: "
                        "they must be the same size")
    h, w = target_size(image, multiple)
    arr = np.asarray(_resize(visible(mask), h, w).convert("L")).astype(np.float32) / 255.0  # resize, then gray
    arr = np.where(arr < 0.5, 0.0, 1.0).astype(np.float32)
    return torch.from_numpy(arr)[None, None]


def to_pil(images: torch.Tensor) -> list[Image.Image]:
    """(B, 3, H, W) in [0, 1] -> PIL images, rounding as diffusers' image processor does."""
    arr = (images.float().permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8)
    return [Image.fromarray(a) for a in arr]
