"""Quality of the quantized tiny-model builds on this machine: each scheme built for the cpu target (ONNX Runtime),
then the same prompts, sizes and seeds through the float32 build and the quantized one: image PSNR, final-latent
cosine, calibration time, weight bytes. NVFP4 exists only for Blackwell targets: it is built for rtx5090 (BF16
base, engines skipped) and run on the Torch backend, which emulates its graphs (ONNX Runtime has no FP4 kernels).
Writes Markdown and JSON under benchmarks/reports/.

    .venv/bin/python benchmarks/quantize_tiny.py --work /tmp/zq [--calib-size 64]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
import time
from pathlib import Path

import numpy as np
import onnxruntime
import torch

from zimage_deploy import build
from zimage_deploy.quantize.gate import cosine, psnr
from zimage_deploy.runtime.pipeline import Pipeline

sys.path.insert(0, str(Path(__file__).parent))
from export_memory import machine  # noqa: E402

SCHEMES = {
    "fp8": ["--precision", "fp8"],
    "fp8 + FP8 attention": ["--precision", "fp8", "--fp8-attention"],
    "fp8, text encoder fp8 too": ["--precision", "fp8", "--text-encoder-precision", "fp8"],
    "int4 AWQ (DiT + text encoder)": ["--precision", "int4"],
    "int4 RTN (DiT + text encoder)": ["--precision", "int4", "--int4-method", "rtn"],
    "nvfp4 DiT (rtx5090, BF16 base, Torch emulation)": ["--precision", "nvfp4", "--text-encoder-precision", "bf16",
                                                        "--target", "rtx5090", "--skip-engines"],
}
CASES = [("A red fox in the snow at dawn, soft light", 256, 256),
         ("一只橘猫趴在窗台上晒太阳，窗外是开满樱花的街道", 192, 320),
         ("Isometric illustration of a tiny island with a windmill, a farm and a harbour", 320, 160),
         ("夜晚的上海外滩，灯火通明，长曝光摄影", 256, 256)]


def outputs(build_dir: Path, backend: str = "onnxruntime"):
    pipe = Pipeline(build_dir, backend=backend)
    lat = [pipe(p, height=h, width=w, seed=i, output="latent", progress=False) for i, (p, h, w) in enumerate(CASES)]
    return lat, [np.asarray(pipe.decode(x, "pil")[0]) for x in lat]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--work", type=Path, required=True)
    ap.add_argument("--calib-size", type=int, default=64)
    ap.add_argument("--report", type=Path, default=Path(__file__).parent / "reports")
    args = ap.parse_args()
    common = ["--model", "tiny", "--skip-parity"]
    assert build.main([*common, "--target", "cpu", "--precision", "fp32", "--out", str(args.work / "fp32")]) == 0
    ref_lat, ref_img = outputs(args.work / "fp32")
    rows = {}
    for name, flags in SCHEMES.items():
        out = args.work / name.split(" ")[0] / str(len(rows))
        t0 = time.perf_counter()
        target = [] if "--target" in flags else ["--target", "cpu"]
        assert build.main([*common, *target, *flags, "--calib-size", str(args.calib_size), "--out", str(out)]) == 0
        seconds = time.perf_counter() - t0
        manifest = json.loads((out / "manifest.json").read_text())
        lat, img = outputs(out, "torch" if "nvfp4" in flags else "onnxruntime")
        quant = {n: c["quantization"] for n, c in manifest["components"].items() if c.get("quantization")}
        gate = manifest["stages"]["quantize"]["quality_gate"]
        rows[name] = {
            "psnr_db": [round(psnr(a, b), 2) for a, b in zip(img, ref_img)],
            "latent_cosine": [round(cosine(a, b), 5) for a, b in zip(lat, ref_lat)],
            "build_seconds": round(seconds, 1),
            "calibration_seconds": manifest["stages"]["quantize"]["calibration_seconds"],
            "weight_bytes": {n: q["weight_bytes"] for n, q in quant.items()},
            "gate": {k: gate[k] for k in ("min_psnr_db", "min_latent_cosine")},
        }
    date = str(dt.date.today())
    report = {"date": date, "machine": machine(), "torch": torch.__version__, "onnxruntime": onnxruntime.__version__,
              "calib_size": args.calib_size, "cases": CASES, "schemes": rows}
    lines = [f"# Quantized tiny model vs float32 ({date}, {machine()})", "",
             f"torch {torch.__version__}, onnxruntime {onnxruntime.__version__}. Each scheme built for the cpu "
             f"target with {args.calib_size} calibration prompts (shipped set); ONNX Runtime on the CPU (nvfp4: rtx5090"
             " target, Torch backend emulating its graphs); same prompts "
             "and seeds as the float32 build: " + "; ".join(f"{p[:30]}.. {h}x{w}" for p, h, w in CASES) + ". "
             "The tiny model has random weights: these figures check the path, they do not predict real-model quality.",
             "", "| scheme | image PSNR dB (per case) | final-latent cosine (min) | calibration s | build s | "
             "quantized weights (before -> after, KB) |", "|---|---|---|---|---|---|"]
    for name, r in rows.items():
        wb = ", ".join(f"{n} {w['before'] / 1e3:.0f} -> {w['after'] / 1e3:.0f}" for n, w in r["weight_bytes"].items())
        lines.append(f"| {name} | {' / '.join(f'{v:.2f}' for v in r['psnr_db'])} | {min(r['latent_cosine']):.5f} | "
                     f"{r['calibration_seconds']} | {r['build_seconds']} | {wb} |")
    args.report.mkdir(parents=True, exist_ok=True)
    (args.report / f"quantize-tiny-cpu-{date}.json").write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n")
    (args.report / f"quantize-tiny-cpu-{date}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
