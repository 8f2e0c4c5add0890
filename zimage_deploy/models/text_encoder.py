"""Qwen3 text encoder cut to what Z-Image uses: `hidden_states[-2]`, the output of the first N-1 decoder
layers before the final norm. The last layer, the final norm and the LM head are never built or loaded.

Own code (a plain Qwen3 decoder stack) so the exported graph is simple: causal + key-padding mask built in the
graph from `attention_mask`, rotate-half RoPE computed in float32, fused QKV and fused gate/up projections.
Loads transformers' Qwen3 weights (`Qwen3Model` or `Qwen3ForCausalLM` layouts) directly.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .layers import Linear, RMSNorm, attention


@dataclass(frozen=True)
class TextEncoderConfig:
    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    intermediate_size: int
    rms_norm_eps: float
    rope_theta: float

    @classmethod
    def from_transformers(cls, cfg: dict) -> "TextEncoderConfig":
        rope = cfg.get("rope_parameters") or {}
        theta = rope.get("rope_theta", cfg.get("rope_theta", 1_000_000.0))
        rope_type = rope.get("rope_type", (cfg.get("rope_scaling") or {}).get("rope_type", "default"))
        if rope_type != "default":
            raise ValueError(f"unsupported Qwen3 rope type {rope_type!r}")
        if cfg.get("attention_bias"):
            raise ValueError("Qwen3 with attention_bias is not supported")
        heads = cfg["num_attention_heads"]
        return cls(
            vocab_size=cfg["vocab_size"],
            hidden_size=cfg["hidden_size"],
            num_hidden_layers=cfg["num_hidden_layers"],
            num_attention_heads=heads,
            num_key_value_heads=cfg.get("num_key_value_heads", heads),
            head_dim=cfg.get("head_dim") or cfg["hidden_size"] // heads,
            intermediate_size=cfg["intermediate_size"],
            rms_norm_eps=cfg.get("rms_norm_eps", 1e-6),
            rope_theta=float(theta),
        )

    @property
    def used_layers(self) -> int:
        return self.num_hidden_layers - 1


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


class QwenAttention(nn.Module):
    def __init__(self, cfg: TextEncoderConfig):
        super().__init__()
        self.h, self.kv, self.d = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.qkv = Linear(cfg.hidden_size, (self.h + 2 * self.kv) * self.d, bias=False)
        self.q_norm = RMSNorm(self.d, cfg.rms_norm_eps)
        self.k_norm = RMSNorm(self.d, cfg.rms_norm_eps)
        self.o_proj = Linear(self.h * self.d, cfg.hidden_size, bias=False)

    def forward(self, x, cos, sin, bias):
        b, s, _ = x.shape
        q, k, v = self.qkv(x).split([self.h * self.d, self.kv * self.d, self.kv * self.d], dim=-1)
        q = self.q_norm(q.view(b, s, self.h, self.d)).transpose(1, 2)
        k = self.k_norm(k.view(b, s, self.kv, self.d)).transpose(1, 2)
        v = v.view(b, s, self.kv, self.d).transpose(1, 2)
        q = (q.float() * cos + rotate_half(q.float()) * sin).to(x.dtype)
        k = (k.float() * cos + rotate_half(k.float()) * sin).to(x.dtype)
        rep = self.h // self.kv
        k = k.repeat_interleave(rep, dim=1)
        v = v.repeat_interleave(rep, dim=1)
        o = attention(q, k, v, bias)
        return self.o_proj(o.transpose(1, 2).reshape(b, s, self.h * self.d))


class QwenMLP(nn.Module):
    def __init__(self, cfg: TextEncoderConfig):
        super().__init__()
        self.gate_up = Linear(cfg.hidden_size, 2 * cfg.intermediate_size, bias=False)
        self.down_proj = Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x):
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        return self.down_proj(nn.functional.silu(gate) * up)


class QwenLayer(nn.Module):
    def __init__(self, cfg: TextEncoderConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = QwenAttention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = QwenMLP(cfg)

    def forward(self, x, cos, sin, bias):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, bias)
        return x + self.mlp(self.post_attention_layernorm(x))


class TextEncoder(nn.Module):
    """input_ids (B, L) int64, attention_mask (B, L) int64 (1 = token, right padding) -> (B, L, hidden).

    Rows of padding positions are computed but meaningless; callers keep only the masked-in tokens."""

    def __init__(self, cfg: TextEncoderConfig):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList([QwenLayer(cfg) for _ in range(cfg.used_layers)])
        d = cfg.head_dim
        inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, d, 2, dtype=torch.int64).float() / d))
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        x = self.embed_tokens(input_ids)
        seq = input_ids.shape[1]
        pos = torch.arange(seq, device=input_ids.device).float()
        freqs = pos[:, None] * self.inv_freq[None, :]
        emb = torch.cat([freqs, freqs], dim=-1)
        cos, sin = emb.cos()[None, None], emb.sin()[None, None]
        idx = torch.arange(seq, device=input_ids.device)
        allowed = (idx[None, :] <= idx[:, None])[None] & (attention_mask[:, None, :] > 0)
        bias = torch.where(allowed, torch.zeros((), dtype=torch.float32), torch.full((), float("-inf")))
        bias = bias[:, None]  # (B, 1, L, L)
        for layer in self.layers:
            x = layer(x, cos, sin, bias)
        return x


def iter_converted(items, used_layers: int):
    """(transformers key, tensor) pairs -> (our key, tensor) pairs, streaming; drops the last layer, the final
    norm and the head; fused projections are yielded once their parts have arrived."""
    pending: dict[str, dict[int, torch.Tensor]] = {}
    fused = {"q_proj": ("qkv", 0, 3), "k_proj": ("qkv", 1, 3), "v_proj": ("qkv", 2, 3),
             "gate_proj": ("gate_up", 0, 2), "up_proj": ("gate_up", 1, 2)}
    for name, tensor in items:
        if name.startswith("model."):
            name = name[len("model."):]
        if name.startswith(("lm_head.", "norm.")):
            continue
        if name.startswith("layers."):
            if int(name.split(".")[1]) >= used_layers:
                continue
            parts = name.split(".")
            if parts[-2] in fused:
                new, idx, total = fused[parts[-2]]
                key = ".".join(parts[:-2] + [new, parts[-1]])
                pending.setdefault(key, {})[idx] = tensor
                if len(pending[key]) == total:
                    got = pending.pop(key)
                    yield key, torch.cat([got[i] for i in range(total)], dim=0)
                continue
        yield name, tensor
    if pending:
        raise ValueError(f"incomplete fused projections in text encoder checkpoint: {sorted(pending)}")


def convert_transformers_items(items, used_layers: int) -> dict[str, torch.Tensor]:
    return dict(iter_converted(items, used_layers))
