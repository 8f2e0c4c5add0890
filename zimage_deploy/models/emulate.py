"""The quantized graphs' arithmetic on Torch modules, from the same scale file: what the Torch backend runs for a
quantized component, and what the quality gate compares where the graphs themselves cannot run (BF16 graphs on a
machine without a GPU).

Weights are replaced by their quantize-dequantize (the scheme's: schemes.py; AWQ: dequantized W / s, times s again,
which is the graph's Mul-by-s on the activation moved onto the weight); FP8 activations are quantize-dequantized by
a pre-hook on the linear layer with the calibrated per-tensor scale, saturating as `QuantizeLinear` does; NVFP4
activations by a pre-hook doing what TensorRT's dynamic FP4 quantization does (block scales from each block of 16,
the calibrated global scale).
"""

from __future__ import annotations

import functools

import torch

from ..numerics import fake_fp8, fp8_scale
from ..schemes import get_scheme
from ..scales import PROBS_AMAX, attention_layers_of, layers_of


def fp8_attention(q, k, v, key_bias, scales):
    """Attention with FP8 quantize-dequantize on both BMMs' inputs, as the graph with --fp8-attention computes it:
    q, k, v with their calibrated scales, the softmax output with the fixed scale of a [0, 1] range."""
    sq, sk, sv = scales
    q, k, v = fake_fp8(q, sq), fake_fp8(k, sk), fake_fp8(v, sv)
    scores = torch.matmul(q, k.transpose(-1, -2)).float() * (q.shape[-1] ** -0.5)
    if key_bias is not None:
        scores = scores + key_bias
    probs = fake_fp8(scores.softmax(dim=-1).to(v.dtype), fp8_scale(torch.tensor(PROBS_AMAX)))
    return torch.matmul(probs, v)


def _weight(w: torch.Tensor, scheme: str, amax: torch.Tensor, pre: torch.Tensor | None, block: int) -> torch.Tensor:
    wf = w.float() if pre is None else w.float() / pre[None, :]
    deq = get_scheme(scheme).fake_weight(wf, amax, w.dtype, block)
    return (deq if pre is None else deq * pre[None, :]).to(w.dtype)


def apply_scales(model: torch.nn.Module, scales: dict[str, torch.Tensor], scheme: str, block: int) -> list[str]:
    """Quantize `model`'s calibrated linear layers in place as the graphs do; returns their names."""
    modules, names, kind = dict(model.named_modules()), layers_of(scales), get_scheme(scheme)
    for name in names:
        m = modules[name]
        pre = scales.get(f"{name}.pre_quant_scale")
        with torch.no_grad():
            m.weight.data = _weight(m.weight.data, scheme, scales[f"{name}.weight_amax"],
                                    None if pre is None else pre.to(m.weight.device), block)
        if f"{name}.input_amax" in scales:
            fake = kind.fake_activation(scales[f"{name}.input_amax"])
            # the graph quantizes the activation after the linear layer's cast to its weight dtype
            m.register_forward_pre_hook(lambda mod, args, fake=fake: (fake(args[0].to(mod.weight.dtype)),))
    for name in attention_layers_of(scales):
        bmm = tuple(fp8_scale(scales[f"{name}.{x}_bmm_amax"]) for x in "qkv")
        modules[name].attend = functools.partial(fp8_attention, scales=bmm)
    return names
