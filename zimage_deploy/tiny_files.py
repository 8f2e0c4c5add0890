"""Single-file checkpoints written from a diffusers-layout one, in the layouts users hold (for tests and memory
measurements): the Z-Image transformer in the original / ComfyUI layout (any prefix; plain or scaled FP8), the
Qwen3 text encoder as one transformers-layout file (ComfyUI's `qwen_3_4b.safetensors`), and the Flux autoencoder in
its original layout (`ae.safetensors`)."""

from __future__ import annotations

import re
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .keymaps import to_original

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0


def _read(folder: Path) -> dict[str, torch.Tensor]:
    state = {}
    for file in sorted(Path(folder).glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            state.update({k: f.get_tensor(k) for k in f.keys()})
    return state


def _fp8_weights(state: dict, scaled: bool) -> dict:
    """The blocks' 2-D weights as float8_e4m3fn (as FP8 checkpoints do; embedders, norms, final layer kept): plain
    (a cast) or scaled (per-tensor scale amax / 448 in `<layer>.scale_weight`, ComfyUI's `scaled_fp8` marker)."""
    out = {}
    for key, t in state.items():
        if t.dim() == 2 and key.endswith(".weight") and re.search(r"(^|\.)(layers|noise_refiner|context_refiner)\.", key):
            if scaled:
                scale = t.float().abs().max() / FP8_MAX
                out[key] = (t.float() / scale).to(FP8)
                out[key[: -len("weight")] + "scale_weight"] = scale.reshape(())
            else:
                out[key] = t.to(FP8)
        else:
            out[key] = t
    if scaled:
        out["scaled_fp8"] = torch.empty(0, dtype=FP8)
    return out


def write_dit(ckpt: Path, out: Path, prefix: str = "model.diffusion_model.", dtype=torch.bfloat16,
              fp8: str = "none", layout: str = "original") -> Path:
    """The checkpoint's transformer as one file: original layout under `prefix` (or diffusers'), in `dtype`;
    `fp8`: 'none' | 'plain' | 'scaled'."""
    state = {k: v.to(dtype) for k, v in _read(Path(ckpt) / "transformer").items()}
    state = to_original(state, prefix) if layout == "original" else {prefix + k: v for k, v in state.items()}
    if fp8 != "none":
        state = _fp8_weights(state, scaled=fp8 == "scaled")
    save_file({k: v.contiguous() for k, v in state.items()}, str(out))
    return out


def write_text_encoder(ckpt: Path, out: Path, prefix: str = "model.", dtype=torch.bfloat16) -> Path:
    """The Qwen3 text encoder as one file, keys under `prefix` (transformers' Qwen3ForCausalLM: `model.`)."""
    state = {k[len("model."):] if k.startswith("model.") else k: v for k, v in
             _read(Path(ckpt) / "text_encoder").items() if not k.startswith("lm_head.")}
    save_file({prefix + k: v.to(dtype).contiguous() for k, v in state.items()}, str(out))
    return out


def _resnet(part: str) -> str:
    return part.replace("conv_shortcut", "nin_shortcut")


def vae_to_original(state: dict[str, torch.Tensor], n_blocks: int) -> dict[str, torch.Tensor]:
    """A diffusers AutoencoderKL state dict in the original (LDM / Flux `ae.safetensors`) layout."""
    out = {}
    attn = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
    for key, t in state.items():
        side, rest = key.split(".", 1)
        m = re.match(r"(down|up)_blocks\.(\d+)\.(resnets|downsamplers|upsamplers)\.(\d+)\.(.*)", rest)
        if m:
            kind, i, sub, j, tail = m.groups()
            i = int(i) if kind == "down" else n_blocks - 1 - int(i)
            if sub == "resnets":
                new = f"{kind}.{i}.block.{j}.{_resnet(tail)}"
            else:
                new = f"{kind}.{i}.{'downsample' if kind == 'down' else 'upsample'}.{tail}"
        elif rest.startswith("mid_block.resnets."):
            j, tail = rest[len("mid_block.resnets."):].split(".", 1)
            new = f"mid.block_{int(j) + 1}.{_resnet(tail)}"
        elif rest.startswith("mid_block.attentions.0."):
            tail = rest[len("mid_block.attentions.0."):]
            name, param = tail.rsplit(".", 1)
            new = f"mid.attn_1.{attn[name]}.{param}"
            if name != "group_norm" and param == "weight":
                t = t.reshape(*t.shape, 1, 1)  # the original's attention projections are 1x1 convolutions
        else:
            new = rest.replace("conv_norm_out", "norm_out")
        out[f"{side}.{new}" if side in ("encoder", "decoder") else key] = t
    return out


def write_vae(ckpt: Path, out: Path, prefix: str = "", dtype=torch.float32) -> Path:
    """The Flux autoencoder in its original layout, as one file."""
    import json

    cfg = json.loads((Path(ckpt) / "vae" / "config.json").read_text())
    state = vae_to_original(_read(Path(ckpt) / "vae"), len(cfg["block_out_channels"]))
    save_file({prefix + k: v.to(dtype).contiguous() for k, v in state.items()}, str(out))
    return out


SAFETENSORS_DTYPES = {torch.bfloat16: "BF16", torch.float32: "F32", torch.float16: "F16", FP8: "F8_E4M3"}


def write_streamed(shapes: dict[str, tuple], out: Path, make, dtype=torch.bfloat16) -> int:
    """One safetensors file of `shapes` written tensor by tensor (`make(name, shape)` draws each): the header
    first, then each tensor's bytes, so memory holds one tensor (a 12 GB file within a few hundred MB)."""
    import json

    size = torch.tensor([], dtype=dtype).element_size()
    header, offset = {}, 0
    for name, shape in shapes.items():
        n = int(torch.tensor(shape).prod()) * size
        header[name] = {"dtype": SAFETENSORS_DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    with open(out, "wb") as f:
        f.write(len(text).to_bytes(8, "little"))
        f.write(text)
        for name, shape in shapes.items():
            f.write(memoryview(make(name, shape).to(dtype).contiguous().view(torch.uint8).numpy()))
    return 8 + len(text) + offset


def pooled_random(seed: int = 0, pool: int = 1 << 26, dtype=torch.bfloat16):
    """`make(name, shape)` for `write_streamed`: each tensor a window of one pool of small normals (in `dtype`), at
    an offset drawn from its name: distinct tensors at disk speed, no arithmetic per element (what a real-size file
    on a busy 2-core machine can afford; the values suit memory measurements, not image quality)."""
    import zlib

    values = (0.02 * torch.randn(pool, generator=torch.Generator().manual_seed(seed))).to(dtype)

    def make(name: str, shape) -> torch.Tensor:
        n = int(torch.tensor(shape).prod())
        if n > pool:
            raise ValueError(f"{name}: {n} elements exceed the pool of {pool}")
        start = zlib.crc32(name.encode()) % (pool - n + 1)
        return values[start:start + n].reshape(shape)

    return make


def write_random_original_dit(out: Path, config: dict, prefix: str = "model.diffusion_model.", seed: int = 0) -> int:
    """A random Z-Image DiT of `config` (diffusers' ZImageTransformer2DModel arguments) as one original-layout
    BF16 file, streamed (the real-size single file of the memory measurement)."""
    from diffusers import ZImageTransformer2DModel

    with torch.device("meta"):
        model = ZImageTransformer2DModel(**config)
    shapes = {k: tuple(v.shape) for k, v in to_original(dict(model.state_dict()), prefix).items()}
    return write_streamed(shapes, out, pooled_random(seed))
