"""FP8 (E4M3), INT4 and NVFP4 quantization arithmetic, written once: the Q/DQ graph writer (quantize/qdq.py), the Torch
emulation of those graphs (models/emulate.py) and the Torch FP8 path (models/fast.py) all quantize through
these functions, so they agree by construction.

Symmetric, scale = amax / max-code; values beyond amax saturate, as `QuantizeLinear` does.

NVFP4: FP4 (E2M1: 0, 0.5, 1, 1.5, 2, 3, 4, 6 and their negatives) in blocks of 16 along the input dimension, each
block with an FP8 E4M3 scale, the FP8 scales themselves scaled by one float32 "global" scale per tensor
(amax / (6 * 448), so the largest block scale lands on E4M3's largest code). Rounding is to nearest, ties to even,
saturating at 6. Values are quantized against the float32 effective block scale (FP8 scale x global); for the
dequantization that scale is rounded to the graph's dtype, as the graph's Cast before the blocked
`DequantizeLinear` does.
"""

from __future__ import annotations

import torch

E4M3_MAX = 448.0
INT4_MAX = 7.0
FP4_MAX = 6.0
NVFP4_BLOCK = 16
FP4_GRID = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)  # E2M1 magnitudes, in code order
MIN_SCALE = 1e-12


def tensor_amax(w: torch.Tensor) -> torch.Tensor:
    """Range of a whole tensor (a per-tensor scale's)."""
    return w.float().abs().amax()


def block_amax(w: torch.Tensor, block: int) -> torch.Tensor:
    """Range of each block of `block` inputs of a (out, in) weight: (out, in / block)."""
    w = w.float()
    return w.reshape(w.shape[0], -1, block).abs().amax(-1)


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
    amax = block_amax(w, block) if amax is None else amax.float().reshape(out_f, in_f // block)
    scale = (amax / INT4_MAX).clamp(min=MIN_SCALE)
    return torch.round(blocks / scale[..., None]).clamp(-8, 7).reshape(out_f, in_f), scale


def to_e2m1(x: torch.Tensor) -> torch.Tensor:
    """Nearest E2M1 value of each element (float32; ties to the even code, beyond 6 saturating to 6)."""
    a = x.float().abs()
    # midpoints between neighbouring magnitudes; at a tie the even code (0, 1, 2, 4 / 0.5 -> 1 is odd) wins
    q = torch.zeros_like(a)
    for lo, hi, tie_up in ((0.0, 0.5, False), (0.5, 1.0, True), (1.0, 1.5, False), (1.5, 2.0, True),
                           (2.0, 3.0, False), (3.0, 4.0, True), (4.0, 6.0, False)):
        mid = (lo + hi) / 2
        q = torch.where((a >= mid) if tie_up else (a > mid), torch.full_like(a, hi), q)
    return torch.copysign(q, x.float())


def e2m1_codes(v: torch.Tensor) -> torch.Tensor:
    """E2M1 values -> their 4-bit codes (sign in bit 3, the magnitude's index in FP4_GRID), as uint8."""
    grid = torch.tensor(FP4_GRID)
    index = torch.bucketize(v.abs().float(), grid)  # exact grid values: their own index
    return (index | (torch.signbit(v).to(torch.int64) << 3)).to(torch.uint8)


def nvfp4_global_scale(amax: torch.Tensor) -> torch.Tensor:
    return (amax.float() / (FP4_MAX * E4M3_MAX)).clamp(min=MIN_SCALE).reshape(())


def nvfp4_blocks(x: torch.Tensor, global_scale: torch.Tensor, dtype: torch.dtype):
    """NVFP4 of `x` in blocks of 16 along its last axis (a weight's input dimension, an activation's features):
    FP4 values (x's shape), FP8 block scales (..., n / 16), and the dequantized tensor in `dtype` (what the graph's
    DequantizeLinear chain computes). The values are divided by the float32 effective scale (FP8 scale x global);
    the dequantization multiplies by it rounded to `dtype`."""
    shape = x.shape
    blocks = x.float().reshape(*shape[:-1], shape[-1] // NVFP4_BLOCK, NVFP4_BLOCK)
    g = global_scale.to(x.device, torch.float32)
    s8 = to_fp8(blocks.abs().amax(-1) / FP4_MAX, g)
    eff = s8.float() * g
    q = to_e2m1(torch.where(eff[..., None] > 0, blocks / eff[..., None].clamp(min=MIN_SCALE), 0.0))
    deq = q * eff.to(dtype).float()[..., None]
    return q.reshape(shape), s8, deq.reshape(shape).to(dtype)


def fake_nvfp4(x: torch.Tensor, global_scale: torch.Tensor) -> torch.Tensor:
    """NVFP4 quantize-dequantize of an activation along its last axis, block scales from each block's own range
    (dynamic, as TensorRT's FP4 dynamic quantization computes them at run time), back in x's dtype."""
    return nvfp4_blocks(x, global_scale, x.dtype)[2]
