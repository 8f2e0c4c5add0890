"""--precision fp8 from an FP8 single file: reuse the file's own FP8 grid, or re-quantize?

The DiT of an FP8 file reaches the graphs upcast (keymaps.py). Quantizing it again with the calibrated per-tensor
range (max |W|) rounds it a second time onto another grid; quantizing it with the file's own scale (plain FP8:
1) gives back the file's FP8 codes exactly. For each quantized DiT layer both are measured — relative L2 error of
the FP8 weight against the file's (dequantized) weight — and the lower one is used; the manifest states the counts
and errors. A layer fused from parts with different scales (w1/w3 -> w13) cannot reuse exactly and is measured
with the largest of them."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import safe_open

from ..keymaps import FP8_DTYPES, is_aux, original_to_diffusers, read_source, scale_key
from ..models.dit import convert_diffusers_key
from ..models.stream import dit_weights
from ..numerics import E4M3_MAX, fake_fp8, fp8_scale


def file_scales(ckpt: Path) -> dict[str, list[float]] | None:
    """Our DiT layer name -> the file's per-tensor scales of its parts (1.0 for plain FP8); None when the
    checkpoint is no FP8 single file. Layers with per-row scales are left out (no per-tensor grid to reuse)."""
    source = read_source(Path(ckpt) / "transformer")
    if source is None or source.get("fp8", "none") == "none":
        return None
    prefix, table = source.get("prefix", ""), {}
    for entry in source["files"]:
        with safe_open(entry["path"], framework="pt") as f:
            keys = set(f.keys())
            for key in sorted(keys):
                if not key.startswith(prefix) or is_aux(key) or f.get_slice(key).get_dtype() not in ("F8_E4M3",
                                                                                                      "F8_E5M2"):
                    continue
                sk = scale_key(keys, key)
                scale = f.get_tensor(sk) if sk else torch.ones(())
                if scale.numel() != 1:
                    continue
                name = key[len(prefix):]
                shape = list(f.get_slice(key).get_shape())
                parts = original_to_diffusers(name, shape) if source["layout"] == "zimage-original" else [(name, 0)]
                for dkey, _ in parts:
                    ours = convert_diffusers_key(dkey).split("#")[0]
                    table.setdefault(ours[: -len(".weight")], []).append(float(scale))
    return table


def _rel_err(w: torch.Tensor, amax: torch.Tensor) -> float:
    q = fake_fp8(w, fp8_scale(amax))
    return float((q - w).norm() / w.norm().clamp(min=1e-30))


def choose(scales: dict[str, torch.Tensor], ckpt: Path, fused_loras: bool = False) -> dict | None:
    """Update `scales` (the DiT's calibrated ones, `<layer>.weight_amax`) in place where the file's own grid is the
    better one; the manifest record (None: no FP8 file)."""
    table = file_scales(ckpt)
    if table is None:
        return None
    if fused_loras:
        return {"source": "fp8 file", "decision": "re-quantized: LoRAs are fused into the weights, the file's grid "
                                                  "no longer holds them"}
    reused, requantized, err = 0, 0, {"reused": 0.0, "requantized": 0.0}
    for name, w in dit_weights(ckpt):
        layer = name[: -len(".weight")] if name.endswith(".weight") else name
        key = f"{layer}.weight_amax"
        if layer not in table or key not in scales:
            continue
        w = w.float()
        calibrated = scales[key]
        own = torch.tensor(max(table[layer]) * E4M3_MAX)
        e_cal, e_own = _rel_err(w, calibrated), _rel_err(w, own)
        if e_own <= e_cal:
            scales[key] = own.reshape(calibrated.shape).to(calibrated.dtype)
            reused += 1
        else:
            requantized += 1
        err["reused"] += min(e_own, e_cal)
        err["requantized"] += e_cal
    n = max(reused + requantized, 1)
    return {"source": "fp8 file", "layers_reusing_file_fp8": reused, "layers_requantized": requantized,
            "mean_rel_err_chosen": err["reused"] / n, "mean_rel_err_if_requantized": err["requantized"] / n,
            "decision": "per layer, the lower relative L2 error of the FP8 weight against the file's weight"}
