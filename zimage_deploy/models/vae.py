"""VAE decoder wrapper: diffusers' AutoencoderKL decoder with the latent scaling/shift and the image
post-processing folded in, so the graph maps final latents straight to an image in [0, 1]."""

from __future__ import annotations

import torch
from torch import nn

from .layers import attention, swap_norms


class FP32GroupNorm(nn.GroupNorm):
    """GroupNorm that computes in float32 whatever the input dtype (used for BF16 builds)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = None if self.weight is None else self.weight.float()
        b = None if self.bias is None else self.bias.float()
        return nn.functional.group_norm(x.float(), self.num_groups, w, b, self.eps).to(x.dtype)


class SpatialSelfAttention:
    """Processor for the VAE mid-block attention (diffusers' AttnProcessor2_0 for spatial self-attention),
    using the shared `attention` so a BF16 graph keeps its softmax in float32."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kw):
        if encoder_hidden_states is not None or attention_mask is not None or attn.spatial_norm is not None \
                or attn.norm_q is not None:
            raise NotImplementedError("only plain spatial self-attention is supported")
        residual = hidden_states
        b, c, h, w = hidden_states.shape
        x = hidden_states.view(b, c, h * w).transpose(1, 2)
        if attn.group_norm is not None:
            x = attn.group_norm(x.transpose(1, 2)).transpose(1, 2)
        q, k, v = (proj(x).view(b, h * w, attn.heads, -1).transpose(1, 2) for proj in (attn.to_q, attn.to_k, attn.to_v))
        out = attention(q, k, v, None).transpose(1, 2).reshape(b, h * w, -1).to(q.dtype)
        out = attn.to_out[1](attn.to_out[0](out))
        out = out.transpose(-1, -2).reshape(b, c, h, w)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor


class VAEDecoder(nn.Module):
    """latents (B, 16, H/8, W/8) float32 -> image (B, 3, H, W) float32 in [0, 1]."""

    def __init__(self, vae):
        super().__init__()
        cfg = vae.config
        self.scaling = float(cfg.scaling_factor)
        self.shift = float(cfg.shift_factor or 0.0)
        self.post_quant_conv = getattr(vae, "post_quant_conv", None)
        self.decoder = vae.decoder
        from diffusers.models.attention_processor import Attention

        for module in self.decoder.modules():
            if isinstance(module, Attention):
                module.set_processor(SpatialSelfAttention())

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        dtype = self.decoder.conv_in.weight.dtype
        z = (latents / self.scaling + self.shift).to(dtype)
        if self.post_quant_conv is not None:
            z = self.post_quant_conv(z)
        image = self.decoder(z).float()
        return (image / 2 + 0.5).clamp(0, 1)

    def use_fp32_norms(self):
        """Swap every GroupNorm for one that computes in float32 (weights shared)."""
        return swap_norms(self, nn.GroupNorm, FP32GroupNorm, lambda m: (m.num_groups, m.num_channels, m.eps, m.affine))


class VAEEncoder(nn.Module):
    """image (B, 3, H, W) in [-1, 1] -> mean, std (B, 16, H/8, W/8) of the latent posterior.

    Sampling (`mean + std * noise`, with the request's generator) and the `(z - shift) * scaling` that maps to
    the DiT's latent space happen in the runtime, in diffusers' order, so seeds reproduce diffusers."""

    def __init__(self, vae):
        super().__init__()
        self.encoder = vae.encoder
        self.quant_conv = getattr(vae, "quant_conv", None)
        from diffusers.models.attention_processor import Attention

        for module in self.encoder.modules():
            if isinstance(module, Attention):
                module.set_processor(SpatialSelfAttention())

    def forward(self, image: torch.Tensor):
        h = self.encoder(image.to(self.encoder.conv_in.weight.dtype))
        if self.quant_conv is not None:
            h = self.quant_conv(h)
        mean, logvar = h.float().chunk(2, dim=1)
        logvar = logvar.clamp(-30.0, 20.0)
        return mean, torch.exp(0.5 * logvar)

    use_fp32_norms = VAEDecoder.use_fp32_norms
