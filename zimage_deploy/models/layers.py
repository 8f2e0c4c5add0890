"""Building blocks shared by the export-friendly models.

Precision rule (the same for every model here): matmuls run in the dtype of their weights (float32 or
bfloat16); norms, RoPE and softmax always compute in float32 and hand back the input dtype. A model is
made BF16 by `to_compute_dtype`, which leaves norm weights and the listed float32 modules alone.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class Linear(nn.Linear):
    """nn.Linear that casts its input to its weight dtype (float32 side inputs into a BF16 layer)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight  # read once: under modelopt calibration each read fake-quantizes the whole weight
        if x.dtype != w.dtype:  # decided while tracing: no Cast node when the dtypes agree
            x = x.to(w.dtype)
        return F.linear(x, w, self.bias)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (xf * self.weight.float()).to(x.dtype)


class FP32LayerNorm(nn.LayerNorm):
    """LayerNorm that computes in float32 whatever the input dtype (used for BF16 builds)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = None if self.weight is None else self.weight.float()
        b = None if self.bias is None else self.bias.float()
        return F.layer_norm(x.float(), self.normalized_shape, w, b, self.eps).to(x.dtype)


def swap_norms(model: nn.Module, old: type, new: type, *args) -> nn.Module:
    """Replace every `old` module (exact type) by `new(*args(child))`, sharing weights."""
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if type(child) is old:
                replacement = new(*args[0](child))
                replacement.weight, replacement.bias = child.weight, child.bias
                setattr(module, name, replacement)
    return model


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_bias: torch.Tensor | None) -> torch.Tensor:
    """Softmax attention over (B, H, S, D) tensors. `key_bias` is an additive float32 mask (0 or -inf)
    broadcastable to (B, H, Sq, Sk).

    Written out (matmul, float32 softmax, matmul) so that the exported graph keeps the softmax in float32
    for BF16 models; TensorRT fuses the pattern into its attention kernels. Eager Torch uses SDPA.
    """
    if not torch.onnx.is_in_onnx_export() and not torch.jit.is_tracing():
        mask = None if key_bias is None else key_bias.to(q.dtype)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    scores = torch.matmul(q, k.transpose(-1, -2)).float() * (q.shape[-1] ** -0.5)
    if key_bias is not None:
        scores = scores + key_bias
    return torch.matmul(scores.softmax(dim=-1).to(v.dtype), v)


def key_bias_from_valid(valid: torch.Tensor) -> torch.Tensor:
    """(B, S) bool, True where a key may be attended -> (B, 1, 1, S) additive float32 mask. Outside export the two
    constants live on `valid`'s device: `where` would copy CPU scalars to the GPU (a host sync, and no CUDA graph)."""
    device = None if torch.onnx.is_in_onnx_export() or torch.jit.is_tracing() else valid.device
    zero = torch.zeros((), dtype=torch.float32, device=device)
    return torch.where(valid, zero, torch.full((), float("-inf"), device=device))[:, None, None, :]


def to_compute_dtype(model: nn.Module, dtype: torch.dtype, keep_fp32: tuple[type, ...] = ()) -> nn.Module:
    """Cast the matmul weights of `model` to `dtype`. Norm weights, the parameters of modules of the
    `keep_fp32` types and all buffers (RoPE tables, frequencies) stay float32, untouched (no round trip)."""
    kept = set()
    for module in model.modules():
        if isinstance(module, (RMSNorm, nn.LayerNorm, nn.GroupNorm) + keep_fp32):
            kept.update(id(p) for p in module.parameters())
    for p in model.parameters():
        if id(p) not in kept and p.is_floating_point():
            p.data = p.data.to(dtype)
    return model
