"""Input images in unusual modes decode to the picture a person sees (tests/image_modes.py computes it in numpy):
read from bytes as the server, batch and generate read uploads (validate.decode_image, sizes from the header
upright), given as PIL images to the runtime, and through the runtime's preprocessing (img2img image, mask,
ControlNet and Edit inputs), each against the 8-bit RGB version of the same picture."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from image_modes import cases
from zimage_deploy.runtime.control import control_pixels, mask_pixels
from zimage_deploy.runtime.images import BACKGROUND, preprocess_image, preprocess_mask, to_rgb, visible
from zimage_deploy.runtime.validate import Limits, decode_image, probe_image

CASES = cases()
LIMITS = Limits(variant="turbo", multiple=16, min_side=16, max_side=512, default_steps=1, default_guidance=0.0,
                default_height=64, default_width=64)


def _picture(source):
    """As the front ends read it: bytes through the header checks and decoding; PIL images as given."""
    if isinstance(source, bytes):
        info = probe_image(source)
        image = decode_image(source, LIMITS)
        assert (info.width, info.height) == image.size == (64, 48)  # upright, as checked before decoding
        return image
    return source


def _close(got: np.ndarray, expected: np.ndarray, tol: int) -> None:
    diff = np.abs(got.astype(np.float64) - expected)
    assert diff.max() <= tol + 0.5, f"off by up to {diff.max():.1f} levels (mean {diff.mean():.2f})"


@pytest.mark.parametrize("name", list(CASES))
def test_decoded_as_seen(name):
    source, expected, tol = CASES[name]
    image = to_rgb(_picture(source))
    assert image.mode == "RGB" and image.size == (64, 48)
    _close(np.asarray(image), expected, tol)


@pytest.mark.parametrize("name", list(CASES))
def test_preprocessing_equals_the_rgb_version(name):
    """The img2img / Edit / ControlNet inputs the runtime makes of the picture equal those of its 8-bit RGB version
    (a 64x48 picture: resized to 48x32 for the 16-px multiple, so the LANCZOS resize runs too)."""
    source, expected, tol = CASES[name]
    image = _picture(source)
    rgb = Image.fromarray(np.rint(expected).astype(np.uint8))
    step = 2.0 / 255 * (tol + 0.5)  # [-1, 1] units of `tol` levels (LANCZOS does not widen a difference)
    for prepare in (lambda im: preprocess_image(im, 16), lambda im: control_pixels(im, 32, 48)):
        got, ref = prepare(image), prepare(rgb)
        assert got.shape == ref.shape
        assert (got - ref).abs().max() <= step + 1e-6


@pytest.mark.parametrize("name", ["I;16 PNG", "I (32-bit gray)", "F (float gray in [0, 1])", "LA PNG",
                                  "P PNG with a transparent entry", "EXIF orientation 6 JPEG"])
def test_masks_as_seen(name):
    """A mask is binarised from the picture a person sees (transparent = white = repaint)."""
    source, expected, tol = CASES[name]
    mask, image = _picture(source), Image.new("RGB", (64, 48))
    rgb = Image.fromarray(np.rint(expected).astype(np.uint8))
    got, ref = preprocess_mask(mask, image, 16), preprocess_mask(rgb, image, 16)
    assert (got != ref).float().mean() <= (0.01 if tol else 0.0)  # rounding can flip a pixel at the threshold
    got, ref = mask_pixels(mask, 32, 48), mask_pixels(rgb, 32, 48)
    assert (got != ref).float().mean() <= (0.01 if tol else 0.0)


def test_transparency_shows_over_white():
    clear = Image.new("RGBA", (16, 16), (10, 200, 30, 0))  # a colour under fully transparent pixels
    assert BACKGROUND == 255 and set(np.asarray(to_rgb(clear)).ravel()) == {255}
    assert visible(Image.new("LA", (4, 4), (0, 0))).mode == "L"  # gray stays gray
    half = np.asarray(to_rgb(Image.new("RGBA", (4, 4), (0, 0, 0, 128))))
    assert np.all(np.abs(half.astype(int) - 127) <= 1)
