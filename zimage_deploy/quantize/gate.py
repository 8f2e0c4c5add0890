"""Quality gate: the quantized build against the same build unquantized, end to end, on one backend.

Same prompts, seeds and size through the sampling loop twice (Edit builds: held-out instructions with held-out
condition images, quantize/edit_inputs.py): once with the quantized components, once with
their unquantized graphs. Image PSNR (8-bit) and the cosine of the final latents per prompt; the build fails
below the thresholds. Backend: ONNX Runtime when the graphs are float32 (the cpu target); otherwise the Torch
backend with the graphs' quantization applied from the same scale files (models/emulate.py) — ONNX Runtime has no BF16
kernels on the CPU and no FP4 ones at all, and TensorRT engines need their GPU.
"""

from __future__ import annotations

import copy
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from ..schemes import SCHEMES
from ..targets import QUANTIZED

# Held out: none of these is in the shipped calibration set.
GATE_PROMPTS = (
    "A lighthouse keeper's cottage on a green hill by the sea, clouds, afternoon light",
    "一位穿红色毛衣的女孩在雪地里堆雪人，背景是松树林",
    "Still life of three pears and a blue ceramic vase on a linen cloth, oil painting",
    "夏日傍晚的西湖，断桥和荷花，远处的雷峰塔",
)


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else float(10 * np.log10(255.0**2 / mse))


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.flatten().double(), b.flatten().double()
    return float(a @ b / (a.norm() * b.norm()).clamp(min=1e-30))


def unquantized_manifest(manifest) -> dict:
    """The same build (a dict or a `Manifest`) with each quantized component pointing at its unquantized graph."""
    ref = copy.deepcopy(dict(manifest))
    for comp in ref["components"].values():
        if comp.get("precision") in QUANTIZED:
            comp.update(comp.pop("unquantized"))
            comp.pop("quantization", None)
    return ref


def run_gate(out: Path, manifest: dict, n_prompts: int, side: int, min_psnr: float, min_cosine: float,
             device: str | None = None) -> dict:
    from ..runtime.backends import OnnxRuntimeBackend, TorchBackend
    from ..runtime.open import PIPELINES
    from ..variants import get_variant

    t0 = time.perf_counter()
    float32 = all(c["compute_dtype"] == "float32" for c in manifest["components"].values())
    onnxruntime = all(SCHEMES[c["precision"]].onnxruntime_runs for c in manifest["components"].values()
                      if c.get("precision") in SCHEMES)
    if float32 and onnxruntime:  # ONNX Runtime has no FP4 kernels
        make, how = OnnxRuntimeBackend, "onnxruntime: quantized graphs vs the unquantized float32 graphs"
    else:
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        make = lambda d, m: TorchBackend(d, m, device=device, torch_mode="eager")  # noqa: E731
        how = (f"torch ({device}): the graphs' quantization applied from the scale files vs the unquantized modules "
               "(ONNX Runtime runs neither BF16 graphs on the CPU nor FP4 ones)")
    pipeline = PIPELINES[get_variant(manifest["variant"]).layout]
    pipes = {"quantized": pipeline(out, make(out, manifest)),
             "reference": pipeline(out, make(out, unquantized_manifest(manifest)))}
    from ..controlnet import sample_request  # a ControlNet build is gated with control images (held out)
    from .edit_inputs import GATE_INSTRUCTIONS, gate_request  # an Edit build with images + instructions (held out)

    omni = pipeline.layout == "omni"
    texts = GATE_INSTRUCTIONS if omni else GATE_PROMPTS
    prompts = [texts[i % len(texts)] for i in range(n_prompts)]
    rows = []
    for i, prompt in enumerate(tqdm(prompts, desc="quality gate", unit="prompt", leave=False)):
        lat, img = {}, {}
        extra = gate_request(i, side) if omni else sample_request(manifest["model"]["facts"], i, side, held_out=True)
        for k, pipe in pipes.items():
            lat[k] = pipe(prompt, height=side, width=side, seed=i, output="latent", progress=False,
                          **extra).float().cpu()
            img[k] = np.asarray(pipe.decode(lat[k].to(pipe.backend.device), "pil")[0])
        rows.append({"prompt": prompt, "seed": i, **({"condition_images": len(extra["images"])} if omni else {}),
                     "psnr_db": round(psnr(img["quantized"], img["reference"]), 2),
                     "latent_cosine": round(cosine(lat["quantized"], lat["reference"]), 5)})
    worst_psnr = min(r["psnr_db"] for r in rows)
    worst_cos = min(r["latent_cosine"] for r in rows)
    return {
        "method": how, "size": [side, side], "steps": pipes["quantized"].defaults["steps"], "prompts": rows,
        "min_psnr_db": worst_psnr, "mean_psnr_db": round(float(np.mean([r["psnr_db"] for r in rows])), 2),
        "min_latent_cosine": worst_cos, "thresholds": {"psnr_db": min_psnr, "latent_cosine": min_cosine},
        "passed": bool(worst_psnr >= min_psnr and worst_cos >= min_cosine),
        "seconds": round(time.perf_counter() - t0, 2),
    }
