"""Build the export-friendly modules of a checkpoint and load its weights (safetensors, streamed)."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ..checkpoint import iter_tensors, read_config
from ..errors import UserError
from .dit import DiTConfig, TimestepEmbedder, ZImageDiT
from .layers import FP32LayerNorm, RMSNorm, swap_norms, to_compute_dtype
from .stream import dit_weights
from .text_encoder import TextEncoder, TextEncoderConfig, iter_converted
from .vae import VAEDecoder, VAEEncoder


def _load(module: nn.Module, items, where: Path) -> None:
    """Copy (name, tensor) pairs into `module` one at a time, cast to each parameter's dtype: memory holds the
    module and one checkpoint tensor, never a second copy of the model."""
    state = module.state_dict(keep_vars=True)
    seen, unexpected = set(), []
    with torch.no_grad():
        for name, tensor in items:
            target = state.get(name)
            if target is None:
                unexpected.append(name)
                continue
            if target.shape != tensor.shape:
                raise UserError(f"weights in {where} do not match the model config: {name} has shape "
                                f"{tuple(tensor.shape)}, the config gives {tuple(target.shape)}")
            target.copy_(tensor)
            seen.add(name)
    missing = [k for k in state if k not in seen]
    if missing or unexpected:
        raise UserError(
            f"weights in {where} do not match the model config: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )


def _empty(model: nn.Module, dtype: torch.dtype, keep_fp32=()) -> nn.Module:
    """A meta-device model allocated on the CPU directly in its compute dtype (matmul weights in `dtype`, norms
    and the `keep_fp32` modules in float32): a BF16 model never exists in float32 first."""
    if dtype != torch.float32:
        to_compute_dtype(model, dtype, keep_fp32=keep_fp32)
    return model.to_empty(device="cpu")


def load_dit(ckpt: Path, dtype: torch.dtype = torch.float32, loras=(), controlnet=None) -> ZImageDiT:
    """`loras`: (lora.formats.Lora, scale) pairs fused into the weights as they stream in (build --lora);
    `controlnet`: a controlnet.ControlNetSource, whose branch the DiT gets (`dit.control`, hints in its main layers)."""
    cfg = DiTConfig.from_diffusers(read_config(ckpt, "transformer"))
    with torch.device("meta"):
        model = ZImageDiT(cfg)
        if controlnet is not None:
            from .controlnet import attach

            attach(model, controlnet.config)
    model = _empty(model, dtype, keep_fp32=(TimestepEmbedder,))
    _restore_buffers(model, cfg)  # non-persistent buffers were left empty by to_empty
    _load(model, dit_weights(ckpt, loras, controlnet), ckpt / "transformer")
    return model.eval().requires_grad_(False)


def _restore_buffers(model: ZImageDiT, cfg: DiTConfig) -> None:
    from .dit import rope_tables

    for axis, (cos, sin) in enumerate(rope_tables(cfg.axes_dims, cfg.axes_lens, cfg.rope_theta)):
        setattr(model, f"rope_cos{axis}", cos)
        setattr(model, f"rope_sin{axis}", sin)
    model.t_embedder.freqs = TimestepEmbedder(cfg.adaln_dim).freqs


def load_text_encoder(ckpt: Path, dtype: torch.dtype = torch.float32) -> TextEncoder:
    cfg = TextEncoderConfig.from_transformers(read_config(ckpt, "text_encoder"))
    with torch.device("meta"):
        model = TextEncoder(cfg)
    model = _empty(model, dtype)
    d = cfg.head_dim
    model.inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, d, 2, dtype=torch.int64).float() / d))
    _load(model, iter_converted(iter_tensors(ckpt / "text_encoder"), cfg.used_layers), ckpt / "text_encoder")
    return model.eval().requires_grad_(False)


def _load_vae(ckpt: Path):
    from diffusers import AutoencoderKL

    return AutoencoderKL.from_pretrained(ckpt, subfolder="vae", use_safetensors=True, dtype=torch.float32)


def load_vae_decoder(ckpt: Path, dtype: torch.dtype = torch.float32) -> VAEDecoder:
    model = VAEDecoder(_load_vae(ckpt)).eval().requires_grad_(False)
    return to_compute_dtype(model.use_fp32_norms(), dtype) if dtype != torch.float32 else model


def load_vae_encoder(ckpt: Path, dtype: torch.dtype = torch.float32) -> VAEEncoder:
    model = VAEEncoder(_load_vae(ckpt)).eval().requires_grad_(False)
    return to_compute_dtype(model.use_fp32_norms(), dtype) if dtype != torch.float32 else model


def _fp32_softmax_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """transformers attention function: our `attention` (float32 softmax also in the exported graph, where
    the exporter would otherwise cast *after* a BF16 softmax)."""
    from .layers import attention

    if scaling is not None and abs(scaling - query.shape[-1] ** -0.5) > 1e-12:
        raise NotImplementedError("only the default attention scaling is supported")
    bias = None if attention_mask is None else attention_mask.float()
    return attention(query, key, value, bias).transpose(1, 2).contiguous(), None


def load_vision_encoder(ckpt: Path, dtype: torch.dtype = torch.float32):
    """transformers' Siglip2VisionModel (the Edit vision tower), with float32-softmax attention."""
    from transformers import AttentionInterface, Siglip2VisionModel
    from transformers.masking_utils import AttentionMaskInterface, eager_mask

    AttentionInterface.register("zimage_fp32_softmax", _fp32_softmax_attention)
    AttentionMaskInterface.register("zimage_fp32_softmax", eager_mask)  # additive float mask, as eager
    model = Siglip2VisionModel.from_pretrained(ckpt / "siglip", dtype=torch.float32,
                                               attn_implementation="zimage_fp32_softmax")
    model = model.eval().requires_grad_(False)
    if dtype == torch.float32:
        return model
    swap_norms(model, nn.LayerNorm, FP32LayerNorm, lambda m: (m.normalized_shape, m.eps, m.elementwise_affine))
    return to_compute_dtype(model, dtype)


LOADERS = {
    "text_encoder": load_text_encoder,
    "transformer": load_dit,
    "context_refiner": load_dit,
    "siglip_refiner": load_dit,
    "vision_encoder": load_vision_encoder,
    "vae_decoder": load_vae_decoder,
    "vae_encoder": load_vae_encoder,
}


# -- the memory-lean export path: two-layer templates (real width) and weights streamed from the checkpoint --
TEMPLATE_LAYERS = 2


def _uninitialized(cls, cfg, dtype):
    """A module for tracing only: built on the meta device, then given random values (the exporter merges
    parameters with equal values, and fresh zero pages would all be equal); the values are never exported."""
    with torch.device("meta"):
        model = cls(cfg)
    model = model.to_empty(device="cpu").to(dtype)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(generator=gen)
    return model


def dit_template(ckpt: Path, dtype: torch.dtype = torch.float32, controlnet=None,
                 layers: int = TEMPLATE_LAYERS) -> tuple[ZImageDiT, int]:
    """The DiT with `layers` main layers (refiners and embedders complete) and the real depth; with a
    ControlNet, its branch complete and main layers that take hints."""
    from dataclasses import replace

    cfg = DiTConfig.from_diffusers(read_config(ckpt, "transformer"))
    model = _uninitialized(ZImageDiT, replace(cfg, n_layers=min(layers, cfg.n_layers)), dtype)
    if controlnet is not None:
        from .controlnet import template_branch

        template_branch(model, controlnet.config, dtype)
    _restore_buffers(model, model.cfg)
    for m in model.modules():  # the precision rule: these stay float32 in every build
        if isinstance(m, (TimestepEmbedder, RMSNorm, nn.LayerNorm)):
            m.float()
    return model.eval().requires_grad_(False), cfg.n_layers


def text_encoder_template(ckpt: Path, dtype: torch.dtype = torch.float32,
                          layers: int = TEMPLATE_LAYERS) -> tuple[TextEncoder, int]:
    from dataclasses import replace

    cfg = TextEncoderConfig.from_transformers(read_config(ckpt, "text_encoder"))
    model = _uninitialized(TextEncoder, replace(cfg, num_hidden_layers=min(layers, cfg.used_layers) + 1),
                           dtype)
    d = cfg.head_dim
    model.inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, d, 2, dtype=torch.int64).float() / d))
    for m in model.modules():
        if isinstance(m, RMSNorm):
            m.float()
    return model.eval().requires_grad_(False), cfg.used_layers


def stream_weights(ckpt: Path, loader: str, loras=(), controlnet=None):
    """(name, tensor) pairs of a component's weights in our naming, read one at a time from safetensors."""
    if loader == "transformer":
        return dit_weights(ckpt, loras, controlnet)
    cfg = TextEncoderConfig.from_transformers(read_config(ckpt, "text_encoder"))
    return iter_converted(iter_tensors(ckpt / "text_encoder"), cfg.used_layers)


TEMPLATES = {"transformer": dit_template, "text_encoder": text_encoder_template}
