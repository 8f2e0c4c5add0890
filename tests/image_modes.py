"""Input pictures in unusual modes, each with the 8-bit RGB picture a person sees, computed here in numpy (never
with the package's conversions): 16-bit gray (PNG I;16, also with a transparent gray value), 16-bit RGB, 32-bit
integer and float gray, gray + alpha, RGBA, palettes with and without a transparent entry, CMYK (JPEG), bilevel,
and every EXIF orientation. Transparency shows over white (runtime/images.py BACKGROUND)."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
from PIL import Image

from conftest import synthetic_image

WHITE = 255.0


def encode(image: Image.Image, fmt: str = "PNG", **options) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **options)
    return buf.getvalue()


def png16(arr: np.ndarray, trns: int | None = None) -> bytes:
    """A 16-bit PNG written by hand (PIL writes no 16-bit RGB): (H, W) gray or (H, W, 3) RGB uint16."""
    h, w = arr.shape[:2]
    color_type = 0 if arr.ndim == 2 else 2
    raw = b"".join(b"\x00" + arr[y].astype(">u2").tobytes() for y in range(h))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    head = chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, color_type, 0, 0, 0))
    extra = chunk(b"tRNS", struct.pack(">H", trns)) if trns is not None else b""
    return b"\x89PNG\r\n\x1a\n" + head + extra + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")


def over_white(rgb: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    a = alpha.astype(np.float64)[..., None] / 255.0
    return rgb.astype(np.float64) * a + WHITE * (1 - a)


def gray3(gray: np.ndarray) -> np.ndarray:
    return np.repeat(gray[..., None], 3, axis=-1).astype(np.float64)


# EXIF orientation o: how the stored pixels are made from the upright picture (the inverse of what a viewer does)
STORED = {1: lambda a: a, 2: lambda a: a[:, ::-1], 3: lambda a: a[::-1, ::-1], 4: lambda a: a[::-1],
          5: lambda a: a.swapaxes(0, 1), 6: lambda a: np.rot90(a, 1), 7: lambda a: a[::-1, ::-1].swapaxes(0, 1),
          8: lambda a: np.rot90(a, -1)}
# and what a viewer does to the stored pixels
UPRIGHT = {1: lambda a: a, 2: lambda a: a[:, ::-1], 3: lambda a: a[::-1, ::-1], 4: lambda a: a[::-1],
           5: lambda a: a.swapaxes(0, 1), 6: lambda a: np.rot90(a, -1), 7: lambda a: a[::-1, ::-1].swapaxes(0, 1),
           8: lambda a: np.rot90(a, 1)}


def with_orientation(upright: Image.Image, orientation: int, fmt: str) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    stored = Image.fromarray(np.ascontiguousarray(STORED[orientation](np.asarray(upright))))
    return encode(stored, fmt, exif=exif.tobytes(), **({"quality": 95} if fmt == "JPEG" else {}))


def cases(width: int = 64, height: int = 48, seed: int = 4) -> dict[str, tuple[object, np.ndarray, int]]:
    """name -> (the input: PNG / JPEG / WebP bytes, or a PIL image for modes no accepted format holds, the RGB
    picture a person sees as float64 (H, W, 3), tolerance in 8-bit levels: 0, or 1 where alpha compositing or
    CMYK conversion rounds)."""
    base = synthetic_image(width, height, seed)
    rgb = np.asarray(base)
    gray = np.asarray(base.convert("L"))
    y, x = np.mgrid[0:height, 0:width]
    alpha = ((x * 255) // (width - 1)).astype(np.uint8)  # fully transparent at the left, opaque at the right
    alpha[: height // 4] = 0
    out: dict[str, tuple[object, np.ndarray, int]] = {}
    out["I;16 PNG"] = (encode(Image.fromarray(gray.astype(np.uint16) * 257)), gray3(gray), 0)
    out["16-bit gray PNG, transparent value"] = (png16(gray.astype(np.uint16) * 257, trns=int(gray[0, 0]) * 257),
                                                 np.where((gray == gray[0, 0])[..., None], WHITE, gray3(gray)), 0)
    out["16-bit RGB PNG"] = (png16(rgb.astype(np.uint16) * 257), rgb.astype(np.float64), 0)
    out["I (32-bit gray)"] = (Image.fromarray(gray.astype(np.int32) * 257), gray3(gray), 0)
    out["F (float gray in [0, 1])"] = (Image.fromarray(gray.astype(np.float32) / 255), gray3(gray), 0)
    out["1 (bilevel)"] = (Image.fromarray(gray > 127), gray3(np.where(gray > 127, 255, 0)), 0)
    la = Image.fromarray(np.stack([gray, alpha], -1), "LA")
    out["LA PNG"] = (encode(la), gray3(over_white(gray[..., None], alpha)[..., 0]), 1)
    rgba = Image.fromarray(np.dstack([rgb, alpha]), "RGBA")
    out["RGBA PNG"] = (encode(rgba), over_white(rgb, alpha), 1)
    out["RGBA WebP (lossless)"] = (encode(rgba, "WEBP", lossless=True, exact=True), over_white(rgb, alpha), 1)
    pal = base.convert("P", palette=Image.Palette.ADAPTIVE, colors=32)
    idx = np.asarray(pal)
    colours = np.asarray(pal.getpalette()[: 3 * 256], dtype=np.float64).reshape(-1, 3)
    out["P PNG"] = (encode(pal), colours[idx], 0)
    transparent = int(idx[height // 2, width // 2])
    out["P PNG with a transparent entry"] = (encode(pal, transparency=transparent),
                                             np.where((idx == transparent)[..., None], WHITE, colours[idx]), 0)
    cmyk_jpeg = encode(base.convert("CMYK"), "JPEG", quality=95)
    cmyk = np.asarray(Image.open(io.BytesIO(cmyk_jpeg))).astype(np.float64)  # the stored CMYK values
    out["CMYK JPEG"] = (cmyk_jpeg, np.rint((255 - cmyk[..., :3]) * (255 - cmyk[..., 3:]) / 255), 1)
    for o in range(2, 9):
        out[f"EXIF orientation {o} PNG"] = (with_orientation(base, o, "PNG"), rgb.astype(np.float64), 0)
    jpeg = with_orientation(base, 6, "JPEG")
    stored = np.asarray(Image.open(io.BytesIO(jpeg)).convert("RGB")).astype(np.float64)
    out["EXIF orientation 6 JPEG"] = (jpeg, np.ascontiguousarray(UPRIGHT[6](stored)), 0)
    return out


def rgb_png(expected: np.ndarray) -> bytes:
    """The 8-bit RGB version of a case's picture, as a PNG."""
    return encode(Image.fromarray(np.rint(expected).astype(np.uint8)))
