"""Each exported component described once: its graph inputs/outputs (names, dtypes, dynamic dims), the module
that computes it, and sample inputs for tracing and for the build-time parity check.

Dims are ints or names; a name is a dynamic axis and is what TensorRT profiles will range over.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from ..variants import is_omni

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "int64": torch.int64, "int32": torch.int32}


@dataclass(frozen=True)
class IO:
    name: str
    dtype: str  # "float32" | "bfloat16" | "int64" | "compute" (the component's compute dtype)
    dims: tuple


# Build-time parity (relative L2 of the exported component against the Torch module in float32, at shapes other
# than the traced ones): over it the build fails and the component is marked rejected. float32 graphs measure
# ~1e-6 (ONNX Runtime vs Torch); BF16 ~1e-2 (Torch BF16 module vs float32). A wrong graph measures ~1.
PARITY_REL_L2 = {"float32": 1e-4, "bfloat16": 5e-2}


@dataclass(frozen=True)
class ComponentSpec:
    name: str
    inputs: tuple[IO, ...]
    outputs: tuple[IO, ...]
    wrap: Callable[[nn.Module], nn.Module]  # loaded model -> module whose forward takes `inputs` in order
    sample: Callable[[dict, dict[str, int]], tuple]  # (model facts, dim sizes) -> input tensors
    parity_rel_l2: dict = field(default_factory=lambda: dict(PARITY_REL_L2))  # compute dtype -> tolerance
    used_where: str | None = None  # an input whose zeros mark outputs nobody reads (parity compares the rest)


class _DiTMethod(nn.Module):
    """Exports one method of the DiT (the prompt-only part, the SigLIP refiner, the Omni step) as a graph."""

    def __init__(self, dit, method: str):
        super().__init__()
        self.dit, self.method = dit, method

    def forward(self, *inputs):
        return getattr(self.dit, self.method)(*inputs)


def _dit_method(method: str):
    return lambda dit: _DiTMethod(dit, method)


STATIC_DIMS = ("text_hidden", "cap_feat_dim", "dim", "latent_channels", "siglip_feat_dim", "patch_dim",
               "vision_patch_dim", "n_hints", "control_in_dim")


def resolve_dims(dims: tuple, facts: dict) -> list:
    """Named static dims replaced by their sizes; dynamic dims keep their names."""
    return [facts[d] if d in STATIC_DIMS else d for d in dims]


def describe_io(spec: "ComponentSpec", facts: dict, compute: torch.dtype) -> dict:
    """The manifest's description of a component's graph I/O (names, dtypes, dims)."""
    def one(io):
        return {"name": io.name, "dtype": resolve_dtype(io, compute), "dims": resolve_dims(io.dims, facts)}
    return {"inputs": [one(i) for i in spec.inputs], "outputs": [one(o) for o in spec.outputs],
            "compute_dtype": str(compute).replace("torch.", "")}


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
        used_where="attention_mask",  # only real tokens are used downstream
    ),
    "context_refiner": ComponentSpec(
        "context_refiner",
        inputs=(IO("cap_feats", "compute", ("batch", "cap_len", "cap_feat_dim")), IO("cap_lens", "int64", ("batch",))),
        outputs=(IO("cap_states", "compute", ("batch", "cap_len", "dim")),),
        wrap=_dit_method("context"),
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

class _VisionEncoder(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, pixel_values, pixel_attention_mask, spatial_shapes):
        return self.model(pixel_values=pixel_values, pixel_attention_mask=pixel_attention_mask,
                          spatial_shapes=spatial_shapes).last_hidden_state


def _omni_sample(facts, d, dtype):
    """A real Omni layout (two prompts of different lengths, one condition image) from the host builder."""
    from ..models.omni import batch_layouts, build_layout

    g = torch.Generator().manual_seed(5)
    cap, sig, c = facts["cap_feat_dim"], facts["siglip_feat_dim"], facts["latent_channels"]
    cond = [torch.randn(c, d["latent_h"] + 4, d["latent_w"], generator=g)]
    sigs = [torch.randn(3, 5, sig, generator=g)]
    lays = [build_layout([torch.randn(n, cap, generator=g) for n in lens], cond, sigs,
                         (d["latent_h"], d["latent_w"]), sig) for lens in ([5, 40, 4], [5, 9, 4])[: d["batch"]]]
    return batch_layouts(lays)


def _sample_context_omni(facts, d, dtype):
    b = _omni_sample(facts, d, dtype)
    return b["cap_feats"].to(dtype), b["cap_pad"], b["cap_pos"], b["cap_valid"]


def _sample_siglip(facts, d, dtype):
    b = _omni_sample(facts, d, dtype)
    return b["sig_feats"].to(dtype), b["sig_pad"], b["sig_pos"], b["sig_valid"]


def _sample_transformer_omni(facts, d, dtype):
    b = _omni_sample(facts, d, dtype)
    g = torch.Generator().manual_seed(6)
    n = d["batch"]
    latents = torch.randn(n, facts["latent_channels"], d["latent_h"], d["latent_w"], generator=g)
    states = lambda k: torch.randn(*b[k].shape[:2], facts["dim"], generator=g).to(dtype)  # noqa: E731
    return (latents, torch.rand(n, generator=g), b["cond_patches"], b["x_pad"], b["x_pos"], b["x_noise"],
            states("cap_pad"), b["cap_pos"], b["cap_valid"], b["cap_noise"],
            states("sig_pad"), b["sig_pos"], b["sig_valid"], b["sig_noise"])


def _sample_vision(facts, d, dtype):
    g = torch.Generator().manual_seed(7)
    n, ph, pw = d["batch"], 3, 5
    patches = facts["vision_patch"] ** 2 * 3
    pixel = torch.rand(n, d["vision_len"], patches, generator=g) * 2 - 1
    mask = torch.zeros(n, d["vision_len"], dtype=torch.int32)
    mask[:, : ph * pw] = 1
    return pixel, mask, torch.tensor([[ph, pw]] * n, dtype=torch.int64)


_CAP = ("batch", "cap_len")
_SIG = ("batch", "sig_len")
_X = ("batch", "x_len")
OMNI_SPECS: dict[str, ComponentSpec] = {
    "context_refiner": ComponentSpec(
        "context_refiner",
        inputs=(IO("cap_feats", "compute", _CAP + ("cap_feat_dim",)), IO("cap_pad", "int64", _CAP),
                IO("cap_pos", "int64", _CAP + (3,)), IO("cap_valid", "int64", _CAP)),
        outputs=(IO("cap_states", "compute", _CAP + ("dim",)),),
        wrap=_dit_method("context_omni"), sample=_sample_context_omni,
    ),
    "siglip_refiner": ComponentSpec(
        "siglip_refiner",
        inputs=(IO("sig_feats", "compute", _SIG + ("siglip_feat_dim",)), IO("sig_pad", "int64", _SIG),
                IO("sig_pos", "int64", _SIG + (3,)), IO("sig_valid", "int64", _SIG)),
        outputs=(IO("sig_states", "compute", _SIG + ("dim",)),),
        wrap=_dit_method("siglip"), sample=_sample_siglip,
    ),
    "transformer": ComponentSpec(
        "transformer",
        inputs=(
            IO("latents", "float32", ("batch", "latent_channels", "latent_h", "latent_w")),
            IO("timestep", "float32", ("batch",)),
            IO("cond_patches", "float32", ("batch", "cond_len", "patch_dim")),
            IO("x_pad", "int64", _X), IO("x_pos", "int64", _X + (3,)), IO("x_noise", "int64", _X),
            IO("cap_states", "compute", _CAP + ("dim",)), IO("cap_pos", "int64", _CAP + (3,)),
            IO("cap_valid", "int64", _CAP), IO("cap_noise", "int64", _CAP),
            IO("sig_states", "compute", _SIG + ("dim",)), IO("sig_pos", "int64", _SIG + (3,)),
            IO("sig_valid", "int64", _SIG), IO("sig_noise", "int64", _SIG),
        ),
        outputs=(IO("noise_pred", "float32", ("batch", "latent_channels", "latent_h", "latent_w")),),
        wrap=_dit_method("forward_omni"), sample=_sample_transformer_omni,
    ),
    "vision_encoder": ComponentSpec(
        "vision_encoder",
        inputs=(IO("pixel_values", "float32", ("batch", "vision_len", "vision_patch_dim")),
                IO("pixel_attention_mask", "int32", ("batch", "vision_len")),
                IO("spatial_shapes", "int64", ("batch", 2))),
        outputs=(IO("hidden_states", "compute", ("batch", "vision_len", "siglip_feat_dim")),),
        wrap=_VisionEncoder, sample=_sample_vision,
    ),
}


def specs_for(variant: str, facts: dict | None = None) -> dict[str, ComponentSpec]:
    """The component specs of a variant: Edit swaps in the Omni context refiner and transformer; a build with a
    ControlNet (its `facts` give `n_hints`) adds the `controlnet` graph and a transformer that takes its hints."""
    if is_omni(variant):
        return {**SPECS, **OMNI_SPECS}
    return {**SPECS, **CONTROL_SPECS} if facts and facts.get("n_hints") else SPECS


def _sample_control(facts, d, dtype):
    latents, t, states, lens = _sample_transformer(facts, d, dtype)
    g = torch.Generator().manual_seed(8)
    control = torch.randn(d["batch"], facts["control_in_dim"], d["latent_h"], d["latent_w"], generator=g)
    return latents, t, states, lens, control, torch.linspace(0.75, 0.5, d["batch"])


def _sample_hinted(facts, d, dtype):
    latents, t, states, lens = _sample_transformer(facts, d, dtype)
    g = torch.Generator().manual_seed(9)
    tokens = (d["latent_h"] // 2) * (d["latent_w"] // 2)
    joint = (tokens + 31) // 32 * 32 + d["cap_len"]  # image tokens padded to 32, then the caption slots
    hints = torch.randn(facts["n_hints"], d["batch"], joint, facts["dim"], generator=g).to(dtype)
    return latents, t, states, lens, hints


class _Hints(nn.Module):
    """The `controlnet` graph: every ControlNet hint of one step (models/controlnet.py `control_hints`)."""

    def __init__(self, dit):
        super().__init__()
        self.dit = dit

    def forward(self, latents, timestep, cap_states, cap_lens, control, scale):
        from ..models.controlnet import control_hints

        return control_hints(self.dit, latents, timestep, cap_states, cap_lens, control, scale)


_LATENTS = ("batch", "latent_channels", "latent_h", "latent_w")
_STEP = (IO("latents", "float32", _LATENTS), IO("timestep", "float32", ("batch",)),
         IO("cap_states", "compute", ("batch", "cap_len", "dim")), IO("cap_lens", "int64", ("batch",)))
# Hints cover the joint sequence: image tokens padded to 32, then the caption slots.
_HINTS = ("n_hints", "batch", "joint_len", "dim")
CONTROL_SPECS: dict[str, ComponentSpec] = {
    "controlnet": ComponentSpec(
        "controlnet",
        inputs=_STEP + (IO("control", "float32", ("batch", "control_in_dim", "latent_h", "latent_w")),
                        IO("scale", "float32", ("batch",))),
        outputs=(IO("hints", "compute", _HINTS),),
        wrap=_Hints, sample=_sample_control,
    ),
    "transformer": ComponentSpec(
        "transformer",
        inputs=_STEP + (IO("hints", "compute", _HINTS),),
        outputs=(IO("noise_pred", "float32", _LATENTS),),
        wrap=lambda m: m, sample=_sample_hinted,
    ),
}


# Shapes used to trace the graphs, and other shapes used to check that the graphs are really dynamic.
TRACE_DIMS = dict(batch=2, text_len=11, cap_len=64, latent_h=8, latent_w=12, vision_len=20)
CHECK_DIMS = dict(batch=1, text_len=6, cap_len=32, latent_h=12, latent_w=6, vision_len=16)
