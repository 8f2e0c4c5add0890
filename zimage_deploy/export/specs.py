"""Each exported component described once: its graph inputs/outputs (names, dtypes, dynamic dims), the module
that computes it, and sample inputs for tracing and for the build-time parity check.

Dims are ints or names; a name is a dynamic axis and is what TensorRT profiles will range over.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "int64": torch.int64}


@dataclass(frozen=True)
class IO:
    name: str
    dtype: str  # "float32" | "bfloat16" | "int64" | "compute" (the component's compute dtype)
    dims: tuple


@dataclass(frozen=True)
class ComponentSpec:
    name: str
    inputs: tuple[IO, ...]
    outputs: tuple[IO, ...]
    wrap: Callable[[nn.Module], nn.Module]  # loaded model -> module whose forward takes `inputs` in order
    sample: Callable[[dict, dict[str, int]], tuple]  # (model facts, dim sizes) -> input tensors


class _Context(nn.Module):
    def __init__(self, dit):
        super().__init__()
        self.dit = dit

    def forward(self, cap_feats, cap_lens):
        return self.dit.context(cap_feats, cap_lens)


def _io_dtype(io: IO, compute: torch.dtype) -> torch.dtype:
    return compute if io.dtype == "compute" else DTYPES[io.dtype]


def resolve_dtype(io: IO, compute: torch.dtype) -> str:
    return {v: k for k, v in DTYPES.items()}[_io_dtype(io, compute)]


def _sample_text(facts, d):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, facts["vocab_size"], (d["batch"], d["text_len"]), generator=g)
    mask = torch.ones_like(ids)
    mask[-1, d["text_len"] // 2:] = 0  # a right-padded row
    return ids, mask


def _sample_context(facts, d, dtype):
    g = torch.Generator().manual_seed(1)
    feats = torch.randn(d["batch"], d["cap_len"], facts["cap_feat_dim"], generator=g).to(dtype)
    lens = torch.tensor([d["cap_len"]] + [max(1, d["cap_len"] - 29)] * (d["batch"] - 1), dtype=torch.int64)
    return feats, lens


def _sample_transformer(facts, d, dtype):
    g = torch.Generator().manual_seed(2)
    latents = torch.randn(d["batch"], facts["latent_channels"], d["latent_h"], d["latent_w"], generator=g)
    t = torch.rand(d["batch"], generator=g)
    states = torch.randn(d["batch"], d["cap_len"], facts["dim"], generator=g).to(dtype)
    lens = torch.tensor([d["cap_len"]] + [max(1, d["cap_len"] - 29)] * (d["batch"] - 1), dtype=torch.int64)
    return latents, t, states, lens


def _sample_vae(facts, d):
    g = torch.Generator().manual_seed(3)
    return (torch.randn(d["batch"], facts["latent_channels"], d["latent_h"], d["latent_w"], generator=g),)


def _sample_image(facts, d):
    g = torch.Generator().manual_seed(4)
    s = facts["vae_scale_factor"]
    return (torch.rand(d["batch"], 3, d["latent_h"] * s, d["latent_w"] * s, generator=g) * 2 - 1,)


SPECS: dict[str, ComponentSpec] = {
    "text_encoder": ComponentSpec(
        "text_encoder",
        inputs=(IO("input_ids", "int64", ("batch", "text_len")), IO("attention_mask", "int64", ("batch", "text_len"))),
        outputs=(IO("hidden_states", "compute", ("batch", "text_len", "text_hidden")),),
        wrap=lambda m: m,
        sample=lambda facts, d, dtype: _sample_text(facts, d),
    ),
    "context_refiner": ComponentSpec(
        "context_refiner",
        inputs=(IO("cap_feats", "compute", ("batch", "cap_len", "cap_feat_dim")), IO("cap_lens", "int64", ("batch",))),
        outputs=(IO("cap_states", "compute", ("batch", "cap_len", "dim")),),
        wrap=_Context,
        sample=_sample_context,
    ),
    "transformer": ComponentSpec(
        "transformer",
        inputs=(
            IO("latents", "float32", ("batch", "latent_channels", "latent_h", "latent_w")),
            IO("timestep", "float32", ("batch",)),
            IO("cap_states", "compute", ("batch", "cap_len", "dim")),
            IO("cap_lens", "int64", ("batch",)),
        ),
        outputs=(IO("noise_pred", "float32", ("batch", "latent_channels", "latent_h", "latent_w")),),
        wrap=lambda m: m,
        sample=_sample_transformer,
    ),
    "vae_decoder": ComponentSpec(
        "vae_decoder",
        inputs=(IO("latents", "float32", ("batch", "latent_channels", "latent_h", "latent_w")),),
        outputs=(IO("image", "float32", ("batch", 3, "height", "width")),),
        wrap=lambda m: m,
        sample=lambda facts, d, dtype: _sample_vae(facts, d),
    ),
    "vae_encoder": ComponentSpec(
        "vae_encoder",
        inputs=(IO("image", "float32", ("batch", 3, "height", "width")),),
        outputs=(IO("mean", "float32", ("batch", "latent_channels", "latent_h", "latent_w")),
                 IO("std", "float32", ("batch", "latent_channels", "latent_h", "latent_w"))),
        wrap=lambda m: m,
        sample=lambda facts, d, dtype: _sample_image(facts, d),
    ),
}

# Shapes used to trace the graphs, and other shapes used to check that the graphs are really dynamic.
TRACE_DIMS = dict(batch=2, text_len=11, cap_len=64, latent_h=8, latent_w=12)
CHECK_DIMS = dict(batch=1, text_len=6, cap_len=32, latent_h=12, latent_w=6)
