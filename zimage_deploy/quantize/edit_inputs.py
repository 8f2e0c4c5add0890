"""The condition images an Edit (omni layout) build is calibrated and gated with.

Calibration: the embedded set (EMBEDDED synthetic pictures drawn here from a seed: a colour gradient, shapes,
stripes and texture — no image files ship with the package) followed by the images of `--calib-images DIR`,
cycled over the calibration prompts (the instructions), at the calibration size; every third prompt takes two condition images, so the
two-image layout is calibrated too. The quality gate draws its own pictures from other seeds, with held-out
instructions: nothing it runs was seen by the calibration.
"""

from __future__ import annotations

import hashlib
import math
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, UnidentifiedImageError

from ..errors import UserError
from ..runtime.omni import check_condition_image

EMBEDDED = 8
GATE_SEED = 10_000  # the gate's pictures: seeds from here on (calibration uses 0 .. EMBEDDED - 1)
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")

# Held out (not in the shipped calibration instructions): the gate's requests
GATE_INSTRUCTIONS = (
    "Turn the scene into a watercolor painting with soft edges",
    "把画面中的主体换成一只橘色的猫，保持背景不变",
    "Make it night time, with warm lights in the windows",
    "增加一场小雪，整体色调变冷",
)


def synthetic_picture(seed: int, width: int, height: int) -> Image.Image:
    """A deterministic test picture: a two-colour gradient, a few filled shapes, stripes and mild noise."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    a, b = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
    t = ((x / width) * np.cos(rng.uniform(0, np.pi)) + (y / height) * np.sin(rng.uniform(0, np.pi)))[..., None]
    arr = a * (1 - t) + b * t
    arr += 20 * np.sin(x / rng.uniform(3, 9))[..., None] * (rng.uniform(0, 1, 3) > 0.5)
    picture = Image.fromarray(np.clip(arr + rng.normal(0, 6, arr.shape), 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(picture)
    for _ in range(int(rng.integers(2, 5))):
        x0, y0 = int(rng.integers(0, width * 3 // 4)), int(rng.integers(0, height * 3 // 4))
        box = (x0, y0, x0 + int(rng.integers(width // 8, width // 2)), y0 + int(rng.integers(height // 8, height // 2)))
        fill = tuple(int(v) for v in rng.integers(0, 256, 3))
        (draw.ellipse if rng.uniform() < 0.5 else draw.rectangle)(box, fill=fill)
    return picture


def read_calib_images(folder: Path | None) -> list[tuple[str, Image.Image]]:
    """(name, RGB image) of every PNG / JPEG / WebP file in `folder`, sorted by name; [] without a folder."""
    if folder is None:
        return []
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"--calib-images {folder}: not a folder")
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise UserError(f"--calib-images {folder} holds no PNG, JPEG or WebP file")
    images = []
    for path in files:
        try:
            with Image.open(path, formats=("PNG", "JPEG", "WEBP")) as im:
                image = im.convert("RGB")
        except (UnidentifiedImageError, OSError, ValueError, SyntaxError, EOFError):
            raise UserError(f"--calib-images: {path} is not a PNG, JPEG or WebP image this build reads") from None
        try:
            check_condition_image(image)
        except UserError as e:
            raise UserError(f"--calib-images: {path}: {e}") from None
        images.append((path.name, image))
    return images


def images_sha256(images: list[tuple[str, Image.Image]]) -> str:
    h = hashlib.sha256()
    for name, image in images:
        h.update(name.encode() + b"\0" + repr(image.size).encode() + image.tobytes())
    return h.hexdigest()


class CalibrationImages:
    """The condition images of calibration request i (the embedded set, then `--calib-images`), at about
    side x side pixels (larger images are scaled down to that area, keeping their aspect ratio)."""

    def __init__(self, side: int, folder: Path | None = None):
        self.side = side
        self.given = read_calib_images(folder)
        embedded = [synthetic_picture(seed, side, side) for seed in range(EMBEDDED)]
        self.images = embedded + [self._fit(image) for _, image in self.given]
        self.sha256 = images_sha256([(f"embedded{i}", im) for i, im in enumerate(embedded)] + self.given)

    def _fit(self, image: Image.Image) -> Image.Image:
        """Scaled down to about side x side pixels of area, but not below 64 px a side (the condition minimum)."""
        w, h = image.size
        scale = min(1.0, max(math.sqrt(self.side ** 2 / (w * h)), 64 / min(w, h)))
        return image if scale == 1.0 else image.resize((max(64, round(w * scale)), max(64, round(h * scale))),
                                                       Image.Resampling.LANCZOS)

    def request(self, i: int) -> dict:
        n = len(self.images)
        return {"images": [self.images[(i + k) % n] for k in range(2 if i % 3 == 2 else 1)]}

    def record(self, folder: Path | None) -> dict:
        return {"embedded": EMBEDDED, "folder": str(folder) if folder else None, "given": len(self.given),
                "sha256": self.sha256}


def gate_request(i: int, side: int) -> dict:
    """The quality gate's request i: a held-out picture (two on every third request) at side x side."""
    count = 2 if i % 3 == 2 else 1
    return {"images": [synthetic_picture(GATE_SEED + i * 2 + k, side, side) for k in range(count)]}
