"""Independent quantization references for the tests, in numpy and ml_dtypes only (never the package's
numerics.py, which the Q/DQ writer and the Torch emulation share).

Symmetric quantization, round to nearest with ties to even (ONNX `QuantizeLinear`), saturating:
- FP8 E4M3, per tensor: scale = amax / 448, values x / scale as float8_e4m3fn;
- INT4, per block of `block` input channels: scale = amax / 7, codes rint(w / scale) clipped to [-8, 7];
- NVFP4 weights: global scale = amax / (6 * 448), per block of 16 an FP8 scale (block amax / 6 / global), values
  w / (FP8 scale * global) as float4_e2m1fn.
INT4 AWQ divides the weight by the pre-quantization scale before quantizing and multiplies the activation by it.
"""

from __future__ import annotations

import json
from pathlib import Path

import ml_dtypes
import numpy as np
import onnx

F32 = np.float32


def rel(a, b) -> float:
    """Relative L2 distance of a from b."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def fp8_scale(amax) -> np.float32:
    return F32(amax) / F32(448)


def fp8_values(x: np.ndarray, scale) -> np.ndarray:
    return (x.astype(F32) / F32(scale)).clip(-448, 448).astype(ml_dtypes.float8_e4m3fn)


def fake_fp8(x: np.ndarray, scale) -> np.ndarray:
    return fp8_values(x, scale).astype(F32) * F32(scale)


def int4_scale(amax: np.ndarray) -> np.ndarray:
    return amax.astype(F32) / F32(7)


def int4_codes(w: np.ndarray, scale: np.ndarray, block: int) -> np.ndarray:
    out_f, in_f = w.shape
    blocks = w.astype(F32).reshape(out_f, in_f // block, block)
    return np.rint(blocks / scale[..., None]).clip(-8, 7).astype(np.int8).reshape(out_f, in_f)


def int4_dequant(codes: np.ndarray, scale: np.ndarray, block: int) -> np.ndarray:
    out_f, in_f = codes.shape
    return (codes.astype(F32).reshape(out_f, -1, block) * scale[..., None]).reshape(out_f, in_f)


def nvfp4_weight(w: np.ndarray, amax) -> tuple[np.ndarray, np.ndarray, np.float32]:
    """FP4 values, FP8 block scales and the global scale of an NVFP4 weight."""
    g = F32(amax) / F32(6 * 448)
    blocks = w.astype(F32).reshape(*w.shape[:-1], -1, 16)
    s8 = (np.abs(blocks).max(-1) / F32(6) / g).clip(max=448).astype(ml_dtypes.float8_e4m3fn)
    eff = s8.astype(F32) * g
    with np.errstate(divide="ignore", invalid="ignore"):
        v = np.where(eff[..., None] > 0, blocks / eff[..., None], 0).clip(-6, 6)
    return v.astype(ml_dtypes.float4_e2m1fn).reshape(w.shape), s8, g


def weight(w: np.ndarray, scheme: str, scales: dict, layer: str, block: int) -> np.ndarray:
    """The dequantized weight a quantized graph should compute for `layer`, in float32 (AWQ: already multiplied
    back by the pre-quantization scale, i.e. the weight the original activation meets)."""
    amax = scales[f"{layer}.weight_amax"]
    pre = scales.get(f"{layer}.pre_quant_scale")
    wp = w.astype(F32) if pre is None else w.astype(F32) / pre[None, :].astype(F32)
    if scheme == "fp8":
        s = fp8_scale(amax)
        deq = fp8_values(wp, s).astype(F32) * s
    elif scheme == "int4":
        s = int4_scale(amax)
        deq = int4_dequant(int4_codes(wp, s, block), s, block)
    else:
        raise ValueError(scheme)
    return deq if pre is None else deq * pre[None, :].astype(F32)


def linear(x: np.ndarray, w: np.ndarray, scheme: str, scales: dict, layer: str, block: int) -> np.ndarray:
    """y = q(x) W_q^T for one quantized linear layer (FP8: activation quantized with the calibrated scale)."""
    amax = scales.get(f"{layer}.input_amax")
    xq = x.astype(F32) if amax is None else fake_fp8(x, fp8_scale(amax))
    return xq @ weight(w, scheme, scales, layer, block).T


def expected_layers(ckpt: Path, component: str, scheme: str, unquantized: onnx.ModelProto, block: int) -> set:
    """The linear layers a quantized component must quantize: DiT per-step graph: the main layers and the noise
    refiner (the context refiner is its own graph), each with attention.qkv, attention.out, feed_forward.w13,
    feed_forward.w2; text encoder: every layer but the last (the graph ends at hidden_states[-2]), each with
    self_attn.qkv, self_attn.o_proj, mlp.gate_up, mlp.down_proj. INT4 (and NVFP4) quantize only layers whose input
    width is a whole number of blocks."""
    if component == "transformer":
        cfg = json.loads((ckpt / "transformer" / "config.json").read_text())
        blocks = [f"layers.{i}" for i in range(cfg["n_layers"])] + \
            [f"noise_refiner.{i}" for i in range(cfg["n_refiner_layers"])]
        names = [f"{b}.{p}" for b in blocks for p in ("attention.qkv", "attention.out", "feed_forward.w13",
                                                      "feed_forward.w2")]
    else:
        cfg = json.loads((ckpt / "text_encoder" / "config.json").read_text())
        names = [f"layers.{i}.{p}" for i in range(cfg["num_hidden_layers"] - 1)
                 for p in ("self_attn.qkv", "self_attn.o_proj", "mlp.gate_up", "mlp.down_proj")]
    width = {"int4": block, "nvfp4": 16}.get(scheme, 1)
    shapes = {t.name: list(t.dims) for t in unquantized.graph.initializer}
    return {n for n in names if shapes[n + ".weight"][1] % width == 0}
