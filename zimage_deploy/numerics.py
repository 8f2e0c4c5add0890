"""FP8 (E4M3) and INT4 quantization arithmetic, written once: the Q/DQ graph writer (quantize/qdq.py), the Torch
emulation of those graphs (quantize/emulate.py) and the Torch FP8 path (models/fast.py) all quantize through
these functions, so they agree by construction.

Symmetric, scale = amax / max-code; values beyond amax saturate, as `QuantizeLinear` does.
"""

from __future__ import annotations

import torch

E4M3_MAX = 448.0
INT4_MAX = 7.0
MIN_SCALE = 1e-12


def weight_amax(w: torch.Tensor, scheme: str, block: int = 0) -> torch.Tensor:
    """Round-to-nearest range of a (out, in) weight: per tensor (fp8) or per block of `block` inputs (int4)."""
    w = w.float()
    return w.abs().amax() if scheme == "fp8" else w.reshape(w.shape[0], -1, block).abs().amax(-1)


def fp8_scale(amax: torch.Tensor) -> torch.Tensor:
    return (amax.float() / E4M3_MAX).clamp(min=MIN_SCALE).reshape(())


def to_fp8(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x / scale as float8_e4m3fn, saturating."""
    return (x.float() / scale).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)


def fake_fp8(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """FP8 quantize-dequantize of `x` (per-tensor `scale`), back in x's dtype."""
    s = scale.to(x.device, torch.float32)
    return (to_fp8(x, s).float() * s).to(x.dtype)


def int4_blocks(w: torch.Tensor, block: int, amax: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric INT4 of a (out, in) weight per block of `block` input channels: codes in [-8, 7] (out, in) and
    scales (out, in / block); `amax` (out, in / block) or the blocks' own range."""
    out_f, in_f = w.shape
    blocks = w.float().reshape(out_f, in_f // block, block)
    amax = weight_amax(w, "int4", block) if amax is None else amax.float().reshape(out_f, in_f // block)
    scale = (amax / INT4_MAX).clamp(min=MIN_SCALE)
    return torch.round(blocks / scale[..., None]).clamp(-8, 7).reshape(out_f, in_f), scale
