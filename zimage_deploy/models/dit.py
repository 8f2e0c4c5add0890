"""Export-friendly Z-Image S3-DiT (own code), loading diffusers' `ZImageTransformer2DModel` weights as they are.

What differs from diffusers' module (results are the same, see tests/test_dit_parity.py):
- tensor inputs instead of lists: a batch of equal-size latents (B, C, H/8, W/8), timesteps (B,), caption
  features padded to a common length (B, S, C_cap) plus their true lengths (B,);
- fused QKV and fused SwiGLU gate/up projections;
- RoPE as real cos/sin tables gathered by position id (no complex numbers);
- split in two: `context()` (caption embedder + context refiner) depends only on the prompt and runs once per
  prompt; `forward()` is the per-step part and takes the context's output.

Diffusers' sequence rules, kept exactly: captions are padded to a multiple of 32 with `cap_pad_token`, image
patches to a multiple of 32 with `x_pad_token`; those pad tokens take part in attention. Caption token j has
position (1 + j, 0, 0) (pad tokens included), image patch (h, w) has (cap_len_padded + 1, h, w), image pad
tokens (0, 0, 0). The joint sequence is [image, caption]. Batch padding beyond an item's padded caption is
masked out of attention.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

import torch
from torch import nn

from .layers import Linear, RMSNorm, attention, key_bias_from_valid

SEQ_MULTIPLE = 32
ADALN_EMBED_DIM = 256
T_FREQ_DIM = 256
T_MID_DIM = 1024


@dataclass(frozen=True)
class DiTConfig:
    in_channels: int = 16
    dim: int = 3840
    n_layers: int = 30
    n_refiner_layers: int = 2
    n_heads: int = 30
    norm_eps: float = 1e-5
    qk_norm: bool = True
    cap_feat_dim: int = 2560
    rope_theta: float = 256.0
    t_scale: float = 1000.0
    axes_dims: tuple[int, ...] = (32, 48, 48)
    axes_lens: tuple[int, ...] = (1536, 512, 512)
    patch_size: int = 2
    siglip_feat_dim: int | None = None  # Edit / Omni: SigLIP features condition the image

    @classmethod
    def from_diffusers(cls, cfg: dict) -> "DiTConfig":
        patch = tuple(cfg.get("all_patch_size", (2,)))
        f_patch = tuple(cfg.get("all_f_patch_size", (1,)))
        if len(patch) != 1 or tuple(f_patch) != (1,):
            raise ValueError(f"unsupported patch sizes {patch}/{f_patch}: only one 2-D patch size is supported")
        # n_kv_heads is in the config but diffusers builds plain multi-head attention: it is not used
        names = {f.name for f in fields(cls)}
        kw = {k: v for k, v in cfg.items() if k in names}
        for key in ("axes_dims", "axes_lens"):
            if key in kw:
                kw[key] = tuple(kw[key])
        return cls(**kw, patch_size=patch[0])

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def adaln_dim(self) -> int:
        return min(self.dim, ADALN_EMBED_DIM)

    @property
    def ffn_dim(self) -> int:
        return int(self.dim / 3 * 8)


def rope_tables(axes_dims, axes_lens, theta: float) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """cos/sin tables per axis, computed exactly as diffusers' RopeEmbedder does (float64 angles, complex64)."""
    tables = []
    for d, n in zip(axes_dims, axes_lens):
        freqs = 1.0 / (theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d))
        angles = torch.outer(torch.arange(n, dtype=torch.float64), freqs).float()
        cis = torch.polar(torch.ones_like(angles), angles)
        tables.append((cis.real.contiguous(), cis.imag.contiguous()))
    return tables


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (B, S, H, D), cos/sin (B or 1, S, D/2): rotate consecutive pairs, in float32."""
    xf = x.float().unflatten(-1, (-1, 2))
    x0, x1 = xf[..., 0], xf[..., 1]
    c, s = cos[:, :, None, :], sin[:, :, None, :]
    out = torch.stack([x0 * c - x1 * s, x0 * s + x1 * c], dim=-1).flatten(-2)
    return out.to(x.dtype)


class Attention(nn.Module):
    def __init__(self, cfg: DiTConfig):
        super().__init__()
        self.n_heads = cfg.n_heads
        self.qkv = Linear(cfg.dim, 3 * cfg.dim, bias=False)
        self.norm_q = RMSNorm(cfg.head_dim, eps=1e-5) if cfg.qk_norm else nn.Identity()
        self.norm_k = RMSNorm(cfg.head_dim, eps=1e-5) if cfg.qk_norm else nn.Identity()
        self.out = Linear(cfg.dim, cfg.dim, bias=False)

    def forward(self, x, cos, sin, key_bias):
        q, k, v = self.qkv(x).unflatten(-1, (3, self.n_heads, -1)).unbind(2)
        q = apply_rope(self.norm_q(q), cos, sin)
        k = apply_rope(self.norm_k(k), cos, sin)
        o = self.attend(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), key_bias)
        return self.out(o.transpose(1, 2).flatten(2))

    dense = False  # set by the Torch runtime when every key is valid (models/fast.py); ignored while exporting

    def attend(self, q, k, v, key_bias):
        """The two attention BMMs and the softmax (where FP8 attention hooks in: quantize/). With `dense` set, eager
        and compiled Torch leave the all-zero mask out, so SDPA can take its flash kernel; exported graphs keep it."""
        if self.dense and not torch.onnx.is_in_onnx_export() and not torch.jit.is_tracing():
            key_bias = None
        return attention(q, k, v, key_bias)


class FeedForward(nn.Module):
    """SwiGLU with the gate (w1) and up (w3) projections fused into one matmul."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.w13 = Linear(dim, 2 * hidden, bias=False)
        self.w2 = Linear(hidden, dim, bias=False)

    def forward(self, x):
        gate, up = self.w13(x).chunk(2, dim=-1)
        return self.w2(nn.functional.silu(gate) * up)


class Block(nn.Module):
    def __init__(self, cfg: DiTConfig, modulation: bool):
        super().__init__()
        self.attention = Attention(cfg)
        self.feed_forward = FeedForward(cfg.dim, cfg.ffn_dim)
        self.attention_norm1 = RMSNorm(cfg.dim, cfg.norm_eps)
        self.ffn_norm1 = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attention_norm2 = RMSNorm(cfg.dim, cfg.norm_eps)
        self.ffn_norm2 = RMSNorm(cfg.dim, cfg.norm_eps)
        self.adaLN_modulation = Linear(cfg.adaln_dim, 4 * cfg.dim) if modulation else None

    def forward(self, x, cos, sin, key_bias, adaln=None, noisy=None, adaln_clean=None):
        """`adaln` (B, adaln_dim) modulates every token; with `noisy` (B, S) bool, tokens where it is False
        take `adaln_clean` instead (Omni: clean condition tokens vs the noisy target)."""
        if self.adaLN_modulation is None:
            x = x + self.attention_norm2(self.attention(self.attention_norm1(x), cos, sin, key_bias))
            return x + self.ffn_norm2(self.feed_forward(self.ffn_norm1(x)))
        mod = self.adaLN_modulation(adaln)[:, None, :]
        if noisy is not None:
            mod = torch.where(noisy[..., None], mod, self.adaLN_modulation(adaln_clean)[:, None, :])
        scale_msa, gate_msa, scale_mlp, gate_mlp = mod.chunk(4, dim=-1)
        attn = self.attention(self.attention_norm1(x) * (1.0 + scale_msa), cos, sin, key_bias)
        x = x + gate_msa.tanh() * self.attention_norm2(attn)
        ffn = self.feed_forward(self.ffn_norm1(x) * (1.0 + scale_mlp))
        return x + gate_mlp.tanh() * self.ffn_norm2(ffn)


class TimestepEmbedder(nn.Module):
    """Sinusoidal timestep features + MLP. Kept in float32 in every precision."""

    def __init__(self, out_dim: int):
        super().__init__()
        half = T_FREQ_DIM // 2
        freqs = torch.exp(-math.log(10000) * torch.arange(0, half, dtype=torch.float32) / half)
        self.register_buffer("freqs", freqs, persistent=False)
        self.linear_1 = nn.Linear(T_FREQ_DIM, T_MID_DIM)
        self.linear_2 = nn.Linear(T_MID_DIM, out_dim)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        args = t.float()[:, None] * self.freqs[None]
        emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
        return self.linear_2(nn.functional.silu(self.linear_1(emb)))


class FinalLayer(nn.Module):
    def __init__(self, cfg: DiTConfig):
        super().__init__()
        self.dim = cfg.dim
        self.adaLN_modulation = Linear(cfg.adaln_dim, cfg.dim)
        self.linear = Linear(cfg.dim, cfg.patch_size**2 * cfg.in_channels)

    def forward(self, x, c):
        scale = 1.0 + self.adaLN_modulation(nn.functional.silu(c))[:, None, :]
        x = nn.functional.layer_norm(x.float(), (self.dim,), eps=1e-6).to(x.dtype)
        return self.linear(x * scale)


class OmniMixin:
    """Omni (Edit) mode with the sequence layout given explicitly (built on the host by models/omni.py):
    positions, pad-token masks, validity (batch padding) and noisy/clean masks are inputs, so one graph serves
    any number and size of condition images. Order of the joint sequence: [caption, image, siglip]."""

    def refine(self, x, is_pad, pad_token, pos, valid, layers):
        x = torch.where(is_pad[..., None] > 0, pad_token.to(x.dtype), x)
        cos, sin = self.rope(pos)
        key_bias = key_bias_from_valid(valid > 0)
        for layer in layers:
            x = layer(x, cos, sin, key_bias)
        return x

    def context_omni(self, cap_feats, cap_pad, cap_pos, cap_valid):
        x = self.cap_linear(self.cap_norm(cap_feats))
        return self.refine(x, cap_pad, self.cap_pad_token, cap_pos, cap_valid, self.context_refiner)

    def siglip(self, sig_feats, sig_pad, sig_pos, sig_valid):
        x = self.siglip_linear(self.siglip_norm(sig_feats))
        return self.refine(x, sig_pad, self.siglip_pad_token, sig_pos, sig_valid, self.siglip_refiner)

    def forward_omni(self, latents, timestep, cond_patches, x_pad, x_pos, x_noise,
                     cap_states, cap_pos, cap_valid, cap_noise, sig_states, sig_pos, sig_valid, sig_noise):
        """latents (B, C, h, w) noisy target; cond_patches (B, Nc, p*p*C) condition latents patchified and padded
        per image to 32 (pad rows arbitrary); x_* describe [conditions, target padded to 32] (Nx tokens) ->
        noise prediction (B, C, h, w), negated like `forward`."""
        cfg = self.cfg
        p = cfg.patch_size
        b, c, h, w = latents.shape
        ht, wt = h // p, w // p
        n = ht * wt
        nc = cond_patches.shape[1]
        dtype = self.x_embedder.weight.dtype
        target = latents.to(dtype).reshape(b, c, ht, p, wt, p).permute(0, 2, 4, 3, 5, 1).reshape(b, n, p * p * c)
        n_pad = x_pad.shape[1] - nc
        j = torch.arange(n_pad, device=latents.device)
        target = target[:, torch.clamp(j, max=n - 1)]  # pad rows: replaced by x_pad_token below
        x = self.x_embedder(torch.cat([cond_patches.to(dtype), target], dim=1))
        x = torch.where(x_pad[..., None] > 0, self.x_pad_token.to(x.dtype), x)

        t_noisy = self.t_embedder(timestep * cfg.t_scale)
        t_clean = self.t_embedder(torch.ones_like(timestep) * cfg.t_scale)
        x_cos, x_sin = self.rope(x_pos)
        x_noisy = x_noise > 0
        for layer in self.noise_refiner:
            x = layer(x, x_cos, x_sin, None, t_noisy, x_noisy, t_clean)

        s = cap_states.shape[1]
        u = torch.cat([cap_states.to(x.dtype), x, sig_states.to(x.dtype)], dim=1)
        cos, sin = self.rope(torch.cat([cap_pos, x_pos, sig_pos], dim=1))
        valid = torch.cat([cap_valid > 0, torch.ones_like(x_noisy), sig_valid > 0], dim=1)
        noisy = torch.cat([cap_noise > 0, x_noisy, sig_noise > 0], dim=1)
        key_bias = key_bias_from_valid(valid)
        for layer in self.layers:
            u = layer(u, cos, sin, key_bias, t_noisy, noisy, t_clean)

        out = self.final_layer(u[:, s + nc: s + nc + n], t_noisy)  # target tokens: all noisy
        out = out.reshape(b, ht, wt, p, p, c).permute(0, 5, 1, 3, 2, 4).reshape(b, c, h, w)
        return -out.float()


class ZImageDiT(OmniMixin, nn.Module):
    def __init__(self, cfg: DiTConfig):
        super().__init__()
        if cfg.head_dim != sum(cfg.axes_dims):
            raise ValueError(f"head_dim {cfg.head_dim} != sum(axes_dims) {sum(cfg.axes_dims)}")
        self.cfg = cfg
        p = cfg.patch_size
        self.x_embedder = Linear(p * p * cfg.in_channels, cfg.dim)
        self.final_layer = FinalLayer(cfg)
        self.t_embedder = TimestepEmbedder(cfg.adaln_dim)
        self.cap_norm = RMSNorm(cfg.cap_feat_dim, cfg.norm_eps)
        self.cap_linear = Linear(cfg.cap_feat_dim, cfg.dim)
        self.x_pad_token = nn.Parameter(torch.zeros(1, cfg.dim))
        self.cap_pad_token = nn.Parameter(torch.zeros(1, cfg.dim))
        self.noise_refiner = nn.ModuleList([Block(cfg, True) for _ in range(cfg.n_refiner_layers)])
        self.context_refiner = nn.ModuleList([Block(cfg, False) for _ in range(cfg.n_refiner_layers)])
        self.layers = nn.ModuleList([Block(cfg, True) for _ in range(cfg.n_layers)])
        if cfg.siglip_feat_dim:
            self.siglip_norm = RMSNorm(cfg.siglip_feat_dim, cfg.norm_eps)
            self.siglip_linear = Linear(cfg.siglip_feat_dim, cfg.dim)
            self.siglip_refiner = nn.ModuleList([Block(cfg, False) for _ in range(cfg.n_refiner_layers)])
            self.siglip_pad_token = nn.Parameter(torch.zeros(1, cfg.dim))
        for axis, (cos, sin) in enumerate(rope_tables(cfg.axes_dims, cfg.axes_lens, cfg.rope_theta)):
            self.register_buffer(f"rope_cos{axis}", cos, persistent=False)
            self.register_buffer(f"rope_sin{axis}", sin, persistent=False)

    # -- helpers ---------------------------------------------------------------------------------------
    def rope(self, pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """pos (..., 3) int64 -> cos, sin (..., head_dim / 2) float32."""
        cos = torch.cat([getattr(self, f"rope_cos{a}")[pos[..., a]] for a in range(3)], dim=-1)
        sin = torch.cat([getattr(self, f"rope_sin{a}")[pos[..., a]] for a in range(3)], dim=-1)
        return cos, sin

    @staticmethod
    def padded_lengths(lengths: torch.Tensor) -> torch.Tensor:
        return (lengths + (SEQ_MULTIPLE - 1)) // SEQ_MULTIPLE * SEQ_MULTIPLE

    def caption_layout(self, cap_lens: torch.Tensor, seq: int):
        """Per caption slot: is it a real token, is it attended (real or pad-to-32), its RoPE cos/sin."""
        j = torch.arange(seq, device=cap_lens.device)
        real = j[None, :] < cap_lens[:, None]
        attended = j[None, :] < self.padded_lengths(cap_lens)[:, None]
        zeros = torch.zeros_like(j)
        cos, sin = self.rope(torch.stack([j + 1, zeros, zeros], dim=-1)[None])
        return real, attended, cos, sin

    # -- the prompt-only part ---------------------------------------------------------------------------
    def context(self, cap_feats: torch.Tensor, cap_lens: torch.Tensor) -> torch.Tensor:
        """cap_feats (B, S, cap_feat_dim) padded text-encoder features, cap_lens (B,) -> (B, S, dim).

        S must be at least the largest padded caption length (runtime pads to a multiple of 32)."""
        real, attended, cos, sin = self.caption_layout(cap_lens, cap_feats.shape[1])
        x = self.cap_linear(self.cap_norm(cap_feats))
        x = torch.where(real[..., None], x, self.cap_pad_token.to(x.dtype))
        key_bias = key_bias_from_valid(attended)
        for layer in self.context_refiner:
            x = layer(x, cos, sin, key_bias)
        return x

    # -- the per-step part ---------------------------------------------------------------------------
    def forward(self, latents, timestep, cap_states, cap_lens, hints=None) -> torch.Tensor:
        """latents (B, C, H/8, W/8) float32, timestep (B,) in [0, 1] (diffusers' `(1000 - t) / 1000`),
        cap_states (B, S, dim) from `context`, cap_lens (B,) -> noise prediction (B, C, H/8, W/8) float32,
        already negated as the pipeline does (the flow-matching velocity for the scheduler). `hints` (n, B, S_img
        padded + S, dim): ControlNet hints, added by the main layers of a DiT with a ControlNet (models/controlnet.py);
        without them the computation (and the exported graph) is the plain one."""
        cfg = self.cfg
        p = cfg.patch_size
        b, c, h, w = latents.shape
        ht, wt = h // p, w // p
        n = ht * wt
        dtype = self.x_embedder.weight.dtype

        # patchify: (B, C, Ht, p, Wt, p) -> (B, Ht*Wt, p*p*C), channels last within a patch
        x = latents.to(dtype).reshape(b, c, ht, p, wt, p).permute(0, 2, 4, 3, 5, 1).reshape(b, n, p * p * c)
        x = self.x_embedder(x)

        # pad the image tokens to a multiple of 32 with x_pad_token (diffusers: copy last row, then replace)
        n_pad = (n + (SEQ_MULTIPLE - 1)) // SEQ_MULTIPLE * SEQ_MULTIPLE
        j = torch.arange(n_pad, device=latents.device)
        is_img = j < n
        x = x[:, torch.clamp(j, max=n - 1)]
        x = torch.where(is_img[None, :, None], x, self.x_pad_token.to(x.dtype))

        cap_padded = self.padded_lengths(cap_lens)
        zeros = torch.zeros_like(j)
        pos = torch.stack(
            [
                torch.where(is_img[None], cap_padded[:, None] + 1, zeros[None]),
                torch.where(is_img, j // wt, zeros).expand(b, -1),
                torch.where(is_img, j % wt, zeros).expand(b, -1),
            ],
            dim=-1,
        )
        x_cos, x_sin = self.rope(pos)

        adaln = self.t_embedder(timestep * cfg.t_scale)
        for layer in self.noise_refiner:
            x = layer(x, x_cos, x_sin, None, adaln)

        # joint [image, caption] sequence
        _, cap_attended, cap_cos, cap_sin = self.caption_layout(cap_lens, cap_states.shape[1])
        x = torch.cat([x, cap_states.to(x.dtype)], dim=1)
        cos = torch.cat([x_cos, cap_cos.expand(b, -1, -1)], dim=1)
        sin = torch.cat([x_sin, cap_sin.expand(b, -1, -1)], dim=1)
        key_bias = key_bias_from_valid(torch.cat([is_img.new_ones(b, n_pad), cap_attended], dim=1))
        extra = {} if hints is None else {"hints": hints}
        for layer in self.layers:
            x = layer(x, cos, sin, key_bias, adaln, **extra)

        out = self.final_layer(x[:, :n], adaln)
        out = out.reshape(b, ht, wt, p, p, c).permute(0, 5, 1, 3, 2, 4).reshape(b, c, h, w)
        return -out.float()


def convert_diffusers_key(name: str, patch_key: str = "2-1") -> str | None:
    """Map one diffusers state-dict key to this module's key. q/k/v and w1/w3 map to a fused key with a
    suffix telling which part they are (`qkv.weight#0`); `fuse_state_dict` assembles them."""
    rename = {
        f"all_x_embedder.{patch_key}.": "x_embedder.",
        f"all_final_layer.{patch_key}.adaLN_modulation.1.": "final_layer.adaLN_modulation.",
        f"all_final_layer.{patch_key}.linear.": "final_layer.linear.",
        "t_embedder.mlp.0.": "t_embedder.linear_1.",
        "t_embedder.mlp.2.": "t_embedder.linear_2.",
        "cap_embedder.0.": "cap_norm.",
        "cap_embedder.1.": "cap_linear.",
        "siglip_embedder.0.": "siglip_norm.",
        "siglip_embedder.1.": "siglip_linear.",
    }
    for old, new in rename.items():
        if name.startswith(old):
            return new + name[len(old):]
    parts = {
        ".attention.to_q.weight": ".attention.qkv.weight#0",
        ".attention.to_k.weight": ".attention.qkv.weight#1",
        ".attention.to_v.weight": ".attention.qkv.weight#2",
        ".attention.to_out.0.weight": ".attention.out.weight",
        ".feed_forward.w1.weight": ".feed_forward.w13.weight#0",
        ".feed_forward.w3.weight": ".feed_forward.w13.weight#1",
        ".adaLN_modulation.0.": ".adaLN_modulation.",
    }
    for old, new in parts.items():
        if old in name:
            return name.replace(old, new)
    return name


def iter_fused(items, n_parts={"qkv": 3, "w13": 2}):
    """(diffusers_key, tensor) pairs -> (our key, tensor) pairs, streaming: a fused projection is yielded as soon
    as its parts have arrived (at most one block's parts are held)."""
    pending: dict[str, dict[int, torch.Tensor]] = {}
    for name, tensor in items:
        key = convert_diffusers_key(name)
        if "#" not in key:
            yield key, tensor
            continue
        key, idx = key.split("#")
        pending.setdefault(key, {})[int(idx)] = tensor
        need = n_parts["qkv" if ".qkv." in key else "w13"]
        if len(pending[key]) == need:
            parts = pending.pop(key)
            yield key, torch.cat([parts[i] for i in range(need)], dim=0)
    if pending:
        raise ValueError(f"incomplete fused projections in checkpoint: {sorted(pending)}")


def fuse_state_dict(items) -> dict[str, torch.Tensor]:
    """(diffusers_key, tensor) pairs -> this module's state dict, concatenating fused projections."""
    return dict(iter_fused(items))
