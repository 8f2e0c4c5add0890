"""ControlNet requests in the sampling loop, reproducing diffusers' `ZImageControlNetPipeline` and
`ZImageControlNetInpaintPipeline`.

Once per request: the control image is resized to the output size (LANCZOS, any aspect ratio: diffusers'
VaeImageProcessor with height and width given), scaled to [-1, 1] and VAE-encoded (posterior mode, no random draw),
then `(mean - shift) * scaling`. An inpainting ControlNet (control_in_dim 33) with an image and a mask takes
[control latents, 1 - mask (nearest, at latent size), latents of the image with the masked region zeroed]; without
them, and for any other control_in_dim above 16, the missing channels are zeros. The sampling itself is
text-to-image from the seed's noise (the image and mask only condition the ControlNet, as in diffusers).

Once per step: the `controlnet` graph gives every hint, already scaled; the transformer adds them. Without a
control image, or with scale 0 for every image, the hints are zero and the controlnet graph does not run: the
transformer then computes the plain image.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ..errors import UserError
from .images import to_rgb, visible
from .timing import timed


@dataclass
class Control:
    """One request's ControlNet input: its latents (1, control_in_dim, h, w), its scale, where its time goes."""

    latents: torch.Tensor
    scale: float
    timings: dict | None = None


def _resized_rgb(image: Image.Image, height: int, width: int) -> np.ndarray:
    rgb = to_rgb(image)
    if rgb.size != (width, height):
        rgb = rgb.resize((width, height), resample=Image.LANCZOS)
    return np.asarray(rgb).astype(np.float32) / 255.0


def control_pixels(image: Image.Image, height: int, width: int) -> torch.Tensor:
    """-> (1, 3, height, width) float32 in [-1, 1]: the image resized to the output size, as diffusers does."""
    return torch.from_numpy(_resized_rgb(image, height, width)).permute(2, 0, 1)[None] * 2.0 - 1.0


def mask_pixels(mask: Image.Image, height: int, width: int) -> torch.Tensor:
    """-> (1, 1, height, width) of 0/1 (1 = repaint): resized in its own mode, then gray, then binarised (diffusers'
    mask processor)."""
    m = visible(mask)
    m = m if m.size == (width, height) else m.resize((width, height), resample=Image.LANCZOS)
    arr = np.asarray(m.convert("L")).astype(np.float32) / 255.0
    return torch.from_numpy(np.where(arr < 0.5, 0.0, 1.0).astype(np.float32))[None, None]


def encode(pipe, pixels: torch.Tensor) -> torch.Tensor:
    """VAE posterior mode of (1, 3, H, W) pixels -> (1, C, H/8, W/8) latents, shifted and scaled."""
    mean = pipe.backend.run("vae_encoder", image=pixels)["mean"].float().cpu()
    return (mean - pipe.facts["vae_shift"]) * pipe.facts["vae_scaling"]


def control_latents(pipe, control_image: Image.Image, height: int, width: int, image=None, mask=None):
    """The ControlNet's input latents (1, control_in_dim, height/8, width/8) for one request."""
    facts = pipe.facts
    if "vae_encoder" not in pipe.manifest["components"]:
        raise UserError(f"{pipe.engine_dir} has no vae_encoder graph (needed for a control image): rebuild it")
    parts = [encode(pipe, control_pixels(control_image, height, width))]
    if image is not None:
        m = mask_pixels(mask, height, width)
        masked = control_pixels(image, height, width) * (m < 0.5)
        latent = encode(pipe, masked)
        parts += [F.interpolate(1 - m, size=latent.shape[-2:], mode="nearest"), latent]
    lat = torch.cat(parts, dim=1)
    missing = facts["control_in_dim"] - lat.shape[1]
    if missing > 0:  # a ControlNet taking more channels than it is given (Union 2.x without inpainting)
        lat = torch.cat([lat, torch.zeros(1, missing, *lat.shape[2:])], dim=1)
    return lat


_zeros_lock = threading.Lock()


def step_hints(pipe, latents: torch.Tensor, t: torch.Tensor, states: torch.Tensor, lens: torch.Tensor,
               control: Control | None) -> torch.Tensor:
    """The transformer's `hints` input for one step: the controlnet graph's output, or zeros (no control image or
    scale 0)."""
    b = latents.shape[0]
    if control is None or control.scale == 0:
        return _zero_hints(pipe, b, latents.shape[-2:], states.shape[1])
    with timed(control.timings, "controlnet"):
        return pipe.backend.run("controlnet", latents=latents, timestep=t, cap_states=states, cap_lens=lens,
                                control=control.latents.expand(b, -1, -1, -1).to(latents.device),
                                scale=torch.full((b,), float(control.scale)))["hints"]


def _zero_hints(pipe, b: int, hw, cap_len: int) -> torch.Tensor:
    """Zero hints, kept for the last shape asked (a step loop asks for the same every step)."""
    facts = pipe.facts
    tokens = (hw[0] // facts["patch_size"]) * (hw[1] // facts["patch_size"])
    shape = (facts["n_hints"], b, (tokens + 31) // 32 * 32 + cap_len, facts["dim"])
    dtype = torch.bfloat16 if pipe.manifest["components"]["transformer"]["compute_dtype"] == "bfloat16" \
        else torch.float32
    with _zeros_lock:
        cached = getattr(pipe, "_zero_hints", None)
        if cached is None or tuple(cached.shape) != shape:
            cached = torch.zeros(shape, dtype=dtype, device=pipe.backend.device)
            pipe._zero_hints = cached
        return cached
