"""Key layouts of single-file checkpoints, read lazily: the user's file stays where it is and its tensors are
renamed (and FP8 ones upcast) one at a time as they stream into the loaders (checkpoint.iter_tensors), so the
memory-lean export reads a 12 GB single file as it reads a diffusers folder.

- The Z-Image transformer in the original repository's / ComfyUI's layout (`ORIGINAL_TO_DIFFUSERS`): fused
  `attention.qkv`, `attention.out`, `q_norm`/`k_norm`, `x_embedder.`, `final_layer.`, under any prefix
  (`model.diffusion_model.`); the inverse (`to_original`) writes such files for tests.
- Qwen3 text encoders in transformers' layout (`model.layers.N...` or `layers.N...`) under any prefix.
- FP8 weights: plain `float8_e4m3fn`/`e5m2` tensors are upcast (exactly) to BF16; "scaled" FP8 files carry a
  per-tensor (or per-row) scale per weight, named the ComfyUI ways (`<layer>.scale_weight`, the older
  `scaled_fp8` files; `<layer>.weight_scale`, the mixed-precision ones), and are dequantized as `fp8 * scale`
  in float32. Input scales and format markers are dropped.

A view folder's component holds `source.json` (written by singlefile.py) instead of weights: the layout, the
prefix and the source files with their size and sha256.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator

import torch
from safetensors import safe_open

SOURCE = "source.json"
FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)
# keys of a scaled-FP8 file that are not weights of the model
SCALE_SUFFIXES = (".scale_weight", ".weight_scale")
DROPPED_SUFFIXES = (".scale_input", ".input_scale", ".comfy_quant")
DROPPED_KEYS = ("scaled_fp8",)

# original Z-Image key part -> diffusers key part (qkv is split into to_q/to_k/to_v separately)
ORIGINAL_TO_DIFFUSERS = {
    "final_layer.": "all_final_layer.2-1.",
    "x_embedder.": "all_x_embedder.2-1.",
    ".attention.out.": ".attention.to_out.0.",
    ".attention.q_norm.": ".attention.norm_q.",
    ".attention.k_norm.": ".attention.norm_k.",
}
QKV = ".attention.qkv.weight"
# keys of the original layout that diffusers' model has no parameter for
ORIGINAL_EXTRA = ("norm_final.weight",)


def _rename(key: str, table: dict[str, str]) -> str:
    """The first rule that applies: a part starting with '.' anywhere in the key, any other at its start."""
    for old, new in table.items():
        if (old in key) if old.startswith(".") else key.startswith(old):
            return key.replace(old, new, 1)
    return key


def original_to_diffusers(key: str, tensor):
    """One original-layout (key, tensor) (prefix already stripped) -> diffusers (key, tensor) pairs: none for the
    keys diffusers drops, three for a fused qkv (views, no copy). `tensor` may be a shape (a list)."""
    if key in ORIGINAL_EXTRA:
        return []
    if key.endswith(QKV):
        base = key[: -len(QKV)] + ".attention."
        if isinstance(tensor, list):
            return [(base + f"to_{p}.weight", [tensor[0] // 3, *tensor[1:]]) for p in "qkv"]
        return [(base + f"to_{p}.weight", t) for p, t in zip("qkv", torch.chunk(tensor, 3, dim=0))]
    return [(_rename(key, ORIGINAL_TO_DIFFUSERS), tensor)]


def to_original(state: dict[str, torch.Tensor], prefix: str = "") -> dict[str, torch.Tensor]:
    """A diffusers Z-Image transformer state dict in the original layout (q/k/v fused), under `prefix`."""
    inverse = {v: k for k, v in ORIGINAL_TO_DIFFUSERS.items()}
    out = {}
    for key, tensor in state.items():
        if ".attention.to_k." in key or ".attention.to_v." in key:
            continue
        if ".attention.to_q.weight" in key:
            base = key.replace(".attention.to_q.weight", ".attention.")
            out[prefix + key.replace(".attention.to_q.weight", QKV)] = torch.cat(
                [state[base + f"to_{p}.weight"] for p in "qkv"], dim=0)
            continue
        out[prefix + _rename(key, inverse)] = tensor
    return out


# -- FP8 -----------------------------------------------------------------------------------------------------------
def scale_key(keys, weight_key: str) -> str | None:
    """The key of `weight_key`'s scale in a scaled-FP8 file, or None."""
    stem = weight_key[: -len("weight")] if weight_key.endswith("weight") else weight_key + "."
    for suffix in SCALE_SUFFIXES:
        if stem + suffix[1:] in keys:
            return stem + suffix[1:]
    return None


def is_aux(key: str) -> bool:
    """A key of a scaled-FP8 file that is no model weight (scales, input scales, format markers)."""
    return key in DROPPED_KEYS or key.endswith(SCALE_SUFFIXES + DROPPED_SUFFIXES)


def dequantize(weight: torch.Tensor, scale: torch.Tensor | None) -> torch.Tensor:
    """An FP8 weight in high precision: BF16 (exact) without a scale, float32 `fp8 * scale` with one (a scalar or
    one value per output row)."""
    if scale is None:
        return weight.to(torch.bfloat16)
    scale = scale.float()
    if scale.numel() > 1:
        scale = scale.reshape(-1, *([1] * (weight.dim() - 1)))
    return weight.float() * scale


def fp8_kind(f, keys) -> str:
    """'none' | 'plain' | 'scaled': the FP8 weights of an open safetensors file."""
    has_fp8 = any(str(f.get_slice(k).get_dtype()).startswith("F8") for k in keys)
    if not has_fp8:
        return "none"
    return "scaled" if any(k.endswith(SCALE_SUFFIXES) for k in keys) else "plain"


# -- reading a view's source -----------------------------------------------------------------------------------------
def read_source(folder: Path) -> dict | None:
    path = Path(folder) / SOURCE
    return json.loads(path.read_text()) if path.is_file() else None


def _model_keys(f, prefix: str) -> list[str]:
    return [k for k in f.keys() if k.startswith(prefix) and not is_aux(k)]


def _convert(layout: str, key: str, tensor):
    if layout == "zimage-original":
        return original_to_diffusers(key, tensor)
    return [(key, tensor)]


MAPPED_BYTES = 1 << 30


def iter_source(source: dict) -> Iterator[tuple[str, torch.Tensor]]:
    """The (key, tensor) pairs of a view's source files in the layout its loader reads (diffusers for the DiT,
    transformers for Qwen3), one tensor at a time, FP8 weights dequantized. The file is opened anew after every
    MAPPED_BYTES read: pages of a mapped file count as resident until it is closed, and a 12 GB single file must
    not become 12 GB of RSS (sharded folders close each shard after it is read)."""
    prefix, layout = source.get("prefix", ""), source["layout"]
    for entry in source["files"]:
        with safe_open(entry["path"], framework="pt") as f:
            all_keys = set(f.keys())
            keys = _model_keys(f, prefix)
        f, read = None, 0
        try:
            for key in keys:
                if f is None or read > MAPPED_BYTES:
                    f, read = safe_open(entry["path"], framework="pt"), 0
                tensor = f.get_tensor(key)
                read += tensor.numel() * tensor.element_size()
                if tensor.dtype in FP8_DTYPES:
                    sk = scale_key(all_keys, key)
                    tensor = dequantize(tensor, f.get_tensor(sk) if sk else None)
                yield from _convert(layout, key[len(prefix):], tensor)
        finally:
            del f


def iter_source_shapes(source: dict) -> Iterator[tuple[str, list[int]]]:
    """(key, shape) pairs of a view's source in its loader's layout, from the headers only."""
    prefix, layout = source.get("prefix", ""), source["layout"]
    for entry in source["files"]:
        with safe_open(entry["path"], framework="pt") as f:
            for key in _model_keys(f, prefix):
                yield from _convert(layout, key[len(prefix):], list(f.get_slice(key).get_shape()))


def source_bytes(source: dict) -> int:
    return sum(e["size"] for e in source["files"])
