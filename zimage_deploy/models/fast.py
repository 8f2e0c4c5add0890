"""The fast Torch path for GPUs: regional `torch.compile` (one compiled region per transformer block, so the
30 identical blocks compile once), CUDA graphs through `mode="reduce-overhead"`, and FP8 (E4M3) linear layers
through `torch._scaled_mm` for the DiT's transformer blocks.

FP8 scales: those of a build's FP8 graphs where it has them (the calibrated per-tensor weight and activation
scales of `quant/transformer.fp8.safetensors`, same layers), else per-tensor weight scales (amax / 448) and per-call
dynamic per-tensor activation scales. The precision-sensitive layers stay BF16: timestep embedder, adaLN
modulations, caption/image embedders, final layer, norms (FP8 on those turned Z-Image into noise upstream).
Fast on SM89+ GPUs; torch's CPU `_scaled_mm` runs it too (for checking).
"""

from __future__ import annotations

import torch
from torch import nn

from ..numerics import fp8_scale, to_fp8
from .dit import Block, ZImageDiT
from .layers import Linear


class FP8Linear(nn.Module):
    """y = x W^T + b with x and W in float8_e4m3fn and per-tensor scales; output in the input's dtype."""

    def __init__(self, linear: nn.Linear, weight_amax: torch.Tensor | None = None,
                 input_amax: torch.Tensor | None = None):
        super().__init__()
        w = linear.weight.detach()
        scale = fp8_scale(w.abs().amax() if weight_amax is None else weight_amax.to(w.device))
        self.register_buffer("weight_t", to_fp8(w, scale).t())  # column-major
        self.register_buffer("weight_scale", scale)
        static = None if input_amax is None else fp8_scale(input_amax).to(w.device)
        self.register_buffer("input_scale", static)  # None: dynamic, per call
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().to(torch.bfloat16))
        self.out_features = linear.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        x_scale = self.input_scale
        if x_scale is None:
            x_scale = fp8_scale(x2.abs().amax())
        x_fp8 = to_fp8(x2, x_scale)
        out = torch._scaled_mm(x_fp8, self.weight_t, scale_a=x_scale, scale_b=self.weight_scale,
                               bias=self.bias, out_dtype=torch.bfloat16)
        return out.reshape(*shape[:-1], self.out_features).to(x.dtype)


def fp8_blocks(model: ZImageDiT, scales: dict[str, torch.Tensor] | None = None) -> int:
    """Swap linear layers for FP8 linears; returns how many were swapped. With `scales` (a build's FP8 calibration
    file): the layers it lists, with its static scales. Without: the attention and feed-forward projections of
    every transformer block (main layers and refiners), dynamic activation scales; adaLN, embedders and the final
    layer are left alone."""
    if scales is not None:
        from ..quantize.calibrate import layers_of

        chosen = set(layers_of(scales))
    else:
        chosen = {f"{bn}.{pn}.{n}" for bn, block in model.named_modules() if isinstance(block, Block)
                  for pn in ("attention", "feed_forward")
                  for n, c in getattr(block, pn).named_children() if isinstance(c, Linear)}
    count = 0
    for name, child in [(n, m) for n, m in model.named_modules() if n in chosen]:
        parent_name, _, attr = name.rpartition(".")
        get = (lambda k: None) if scales is None else (lambda k: scales.get(f"{name}.{k}"))
        setattr(model.get_submodule(parent_name), attr, FP8Linear(child, get("weight_amax"), get("input_amax")))
        count += 1
    return count


def compile_blocks(model: nn.Module, mode: str | None = "reduce-overhead") -> int:
    """Regional compilation: compile each transformer block in place (same code, so one compile serves
    all); returns the number of blocks compiled."""
    import torch._dynamo

    # parameters become graph inputs, so the 30 identical blocks share one compiled graph (no recompiles)
    torch._dynamo.config.inline_inbuilt_nn_modules = True
    count = 0
    for module in model.modules():
        if isinstance(module, Block):
            module.compile(mode=mode, dynamic=False)
            count += 1
    return count


def dit_flops(cfg, image_tokens: int, caption_tokens: int, batch: int = 1) -> float:
    """Multiply-add FLOPs (x2) of one per-step transformer call: the noise refiner on the padded image tokens,
    the main layers on image + caption tokens, and the final layer (the context refiner runs once per prompt
    and is not counted). Linear layers: 2 * tokens * in * out; attention: 4 * S^2 * dim per block."""
    pad = lambda n: -(-n // 32) * 32  # noqa: E731
    d, f = cfg.dim, cfg.ffn_dim
    per_token = 2 * (d * 3 * d + d * d + d * 2 * f + f * d)  # qkv, out, w13, w2
    def block(s):  # noqa: E306
        return s * per_token + 4 * s * s * d
    x = pad(image_tokens)
    s = x + pad(caption_tokens)
    total = cfg.n_refiner_layers * block(x) + cfg.n_layers * block(s)
    total += 2 * image_tokens * d * cfg.patch_size**2 * cfg.in_channels * 2  # x embedder + final linear
    return float(batch * total)
