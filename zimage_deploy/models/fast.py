"""The fast Torch path for GPUs, as model transformations (the runtime side is runtime/torch_fast.py):

- regional `torch.compile`: one compiled region per repeated layer (the 30 identical DiT blocks compile once; the
  text encoder's decoder layers likewise), with or without CUDA graphs per region (`mode="reduce-overhead"`);
- FP8 (E4M3) linear layers through `torch._scaled_mm` for the DiT's transformer blocks, optionally with fast
  (reduced-precision) accumulation;
- dense attention: the Torch runtime leaves the attention mask out when every key is valid (batch 1, or equal
  caption lengths), so SDPA can take its flash kernel; exported graphs always keep the mask;
- `share_copy`: a copy of a module's structure that shares its tensors, so one base model can be compiled, FP8-swapped
  or graph-captured per use without touching the original (and without a second copy of the weights).

FP8 scales: static per-tensor activation scales where calibrated ones are given (a build's FP8 calibration file,
`quant/transformer.fp8.safetensors`, or `record_input_amax` over a few runs), else per-call dynamic per-tensor
activation scales; weight scales per tensor (calibrated or amax / 448). Every scale stays a device tensor (no host
synchronisation). The precision-sensitive layers stay BF16: timestep embedder, adaLN modulations, caption/image
embedders, final layer, norms (FP8 on those turned Z-Image into noise upstream). Fast on SM89+ GPUs; torch's CPU
`_scaled_mm` runs it too (for checking).
"""

from __future__ import annotations

import copy
import warnings
from contextlib import contextmanager

import torch
from torch import nn

from ..numerics import fp8_scale, to_fp8
from .dit import Attention, Block, ZImageDiT
from .layers import Linear


class FP8Linear(nn.Module):
    """y = x W^T + b with x and W in float8_e4m3fn and per-tensor scales; output in the input's dtype.
    `fast_accum`: `_scaled_mm`'s fast accumulation (Hopper: faster, fewer accumulation bits)."""

    def __init__(self, linear: nn.Linear, weight_amax: torch.Tensor | None = None,
                 input_amax: torch.Tensor | None = None, fast_accum: bool = False):
        super().__init__()
        w = linear.weight.detach()
        scale = fp8_scale(w.abs().amax() if weight_amax is None else weight_amax.to(w.device))
        self.register_buffer("weight_t", to_fp8(w, scale).t())  # column-major
        self.register_buffer("weight_scale", scale)
        static = None if input_amax is None else fp8_scale(input_amax).to(w.device)
        self.register_buffer("input_scale", static)  # None: dynamic, per call
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().to(torch.bfloat16))
        self.out_features = linear.out_features
        self.fast_accum = fast_accum

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        x_scale = self.input_scale
        if x_scale is None:
            x_scale = fp8_scale(x2.abs().amax())
        x_fp8 = to_fp8(x2, x_scale)
        out = torch._scaled_mm(x_fp8, self.weight_t, scale_a=x_scale, scale_b=self.weight_scale,
                               bias=self.bias, out_dtype=torch.bfloat16, use_fast_accum=self.fast_accum)
        return out.reshape(*shape[:-1], self.out_features).to(x.dtype)


def block_projections(model: ZImageDiT) -> list[str]:
    """Names of the attention and feed-forward projections of every transformer block (main layers and refiners):
    the layers FP8 runs when no calibration file says otherwise."""
    return sorted(f"{bn}.{pn}.{n}" for bn, block in model.named_modules() if isinstance(block, Block)
                  for pn in ("attention", "feed_forward")
                  for n, c in getattr(block, pn).named_children() if isinstance(c, Linear))


def fp8_blocks(model: ZImageDiT, scales: dict[str, torch.Tensor] | None = None, fast_accum: bool = False) -> int:
    """Swap linear layers for FP8 linears in place; returns how many were swapped. With `scales` (a build's FP8
    calibration file, or `record_input_amax`'s): the layers it lists, with its static scales. Without: the
    attention and feed-forward projections of every transformer block, dynamic activation scales; adaLN,
    embedders and the final layer are left alone."""
    if scales is not None:
        from ..scales import layers_of

        chosen = set(layers_of(scales))
    else:
        chosen = set(block_projections(model))
    count = 0
    for name, child in [(n, m) for n, m in model.named_modules() if n in chosen]:
        parent_name, _, attr = name.rpartition(".")
        get = (lambda k: None) if scales is None else (lambda k: scales.get(f"{name}.{k}"))
        setattr(model.get_submodule(parent_name), attr,
                FP8Linear(child, get("weight_amax"), get("input_amax"), fast_accum))
        count += 1
    return count


@contextmanager
def record_input_amax(model: nn.Module, names: list[str]):
    """Within the block, record the largest |input| of each named linear layer (device tensors, no host sync);
    yields the dict, filled with `{name}.input_amax` and `{name}.weight_amax` as `fp8_blocks` takes them."""
    scales: dict[str, torch.Tensor] = {}
    hooks = []
    for name in names:
        layer = model.get_submodule(name)
        scales[f"{name}.weight_amax"] = layer.weight.detach().abs().amax().float()

        def hook(mod, args, key=f"{name}.input_amax"):
            amax = args[0].detach().abs().amax().float()
            scales[key] = amax if key not in scales else torch.maximum(scales[key], amax)

        hooks.append(layer.register_forward_pre_hook(hook))
    try:
        yield scales
    finally:
        for h in hooks:
            h.remove()
    missing = [n for n in names if f"{n}.input_amax" not in scales]
    if missing:
        raise ValueError(f"no input seen by {missing[:3]} ({len(missing)} layers): run the model inside the block")


def compile_regions(model: nn.Module, types: tuple[type, ...], mode: str | None = None,
                    backend: str = "inductor") -> int:
    """Regional compilation: compile every module of the given types in place (same code, so one compile serves
    all of them); returns the number of modules compiled. `mode="reduce-overhead"`: a CUDA graph per region."""
    import torch._dynamo

    # parameters become graph inputs, so identical layers share one compiled graph (no recompiles); the default
    # (and the only behaviour, with a deprecation warning when set) in recent torch
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        if not getattr(torch._dynamo.config, "inline_inbuilt_nn_modules", True):
            torch._dynamo.config.inline_inbuilt_nn_modules = True
    count = 0
    for module in model.modules():
        if isinstance(module, types):
            module.compile(backend=backend, mode=mode, dynamic=False)
            count += 1
    return count


def compile_blocks(model: nn.Module, mode: str | None = "reduce-overhead", backend: str = "inductor") -> int:
    """Regional compilation of the DiT's transformer blocks (see `compile_regions`)."""
    return compile_regions(model, (Block,), mode, backend)


def share_copy(module: nn.Module) -> nn.Module:
    """A copy of `module`'s structure sharing its parameters and buffers: compile it, swap its layers or toggle
    its flags without changing `module`, at no memory cost. Copy before compiling (a compiled module's copy carries
    its compiled callables along)."""
    memo = {id(t): t for t in (*module.parameters(), *module.buffers())}
    return copy.deepcopy(module, memo)


def set_dense_attention(model: nn.Module, dense: bool) -> int:
    """Leave the attention mask out (True) or in (False) in every DiT attention of `model`; returns how many.
    Only for inputs where every key is valid (the caller checks; runtime/torch_fast.py does from the lengths)."""
    count = 0
    for module in model.modules():
        if isinstance(module, Attention):
            module.dense = dense
            count += 1
    return count


def block_flops(cfg, tokens: int) -> int:
    """Multiply-add FLOPs (x2) of one DiT block on `tokens` tokens: qkv, out, w13, w2, and attention (4 S^2 dim)."""
    d, f = cfg.dim, cfg.ffn_dim
    return tokens * 2 * (d * 3 * d + d * d + d * 2 * f + f * d) + 4 * tokens * tokens * d


def dit_flops(cfg, image_tokens: int, caption_tokens: int, batch: int = 1) -> float:
    """Multiply-add FLOPs (x2) of one per-step transformer call: the noise refiner on the padded image tokens,
    the main layers on image + caption tokens, and the final layer (the context refiner runs once per prompt
    and is not counted). Linear layers: 2 * tokens * in * out; attention: 4 * S^2 * dim per block."""
    pad = lambda n: -(-n // 32) * 32  # noqa: E731
    x = pad(image_tokens)
    s = x + pad(caption_tokens)
    total = cfg.n_refiner_layers * block_flops(cfg, x) + cfg.n_layers * block_flops(cfg, s)
    total += 2 * image_tokens * cfg.dim * cfg.patch_size**2 * cfg.in_channels * 2  # x embedder + final linear
    return float(batch * total)
