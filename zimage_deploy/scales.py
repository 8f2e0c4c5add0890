"""Scale files: what calibration writes and the graph rewrite, the emulation and the Torch FP8 path read (a leaf).

Scale file keys, per quantized linear module NAME (the ONNX initializer of its weight is NAME.weight):
  NAME.weight_amax      per tensor (FP8, NVFP4's global scale) or per block, (out, in / block) (INT4)
  NAME.input_amax       FP8 activations, per tensor; NVFP4: the range behind the activations' global scale
  NAME.pre_quant_scale  INT4 AWQ: the activation is multiplied by it and the weight divided by it, per input channel
and per attention module ATTN of the DiT with FP8 attention: ATTN.q_bmm_amax, ATTN.k_bmm_amax, ATTN.v_bmm_amax.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, safe_open, save_file

from .fsutil import atomic_file

PROBS_AMAX = 1.0  # FP8 attention: the softmax output's range, a fixed scale (no key in the file)
META_KEY = "zimage_deploy"  # the file's metadata, one JSON object under one key


def save_scales(path: Path, scales: dict[str, torch.Tensor], meta: dict[str, str]) -> None:
    """Written byte for byte the same for the same scales: safetensors orders a multi-key metadata map differently
    from run to run, so the metadata is one key holding sorted JSON."""
    text = json.dumps({k: str(v) for k, v in meta.items()}, sort_keys=True, ensure_ascii=False)
    with atomic_file(path, suffix=".safetensors") as tmp:
        save_file(scales, str(tmp), metadata={META_KEY: text})


def load_scales(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(scales, metadata); files written before the metadata was one key are read as they are."""
    with safe_open(str(path), "pt") as f:
        meta = f.metadata() or {}
    if META_KEY in meta:
        meta = json.loads(meta[META_KEY])
    return load_file(str(path)), meta


def layers_of(scales: dict) -> list[str]:
    return sorted({k.rsplit(".", 1)[0] for k in scales if k.endswith(".weight_amax")})


def attention_layers_of(scales: dict) -> list[str]:
    return sorted({k.rsplit(".", 1)[0] for k in scales if k.endswith(".q_bmm_amax")})
