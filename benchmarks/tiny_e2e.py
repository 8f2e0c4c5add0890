"""End-to-end time of the tiny Turbo pipeline on this machine: diffusers eager (float32) against our ONNX Runtime
and Torch backends, same prompt, seed, steps and size, in one process. A benchmark, not a test.

    .venv/bin/python benchmarks/tiny_e2e.py [--size 256] [--steps 8] [--repeats 5] [--report benchmarks/reports]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from zimage_deploy import build as build_mod
from zimage_deploy.runtime.pipeline import Pipeline
from zimage_deploy.tiny import ensure_tiny

PROMPT = "a red fox in the snow, watercolor"


def timed(fn, repeats: int) -> tuple[list[float], object]:
    fn()  # warm-up
    times, out = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return times, out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--report", type=Path, default=None)
    args = ap.parse_args()

    from diffusers import ZImagePipeline

    ckpt = ensure_tiny()
    out = build_mod.default_out("tiny", "turbo", "cpu", "fp32")
    build_mod.build("tiny", "turbo", "cpu", "fp32", out, log=lambda *_: None)
    size, steps, seed = args.size, args.steps, 42

    ref = ZImagePipeline.from_pretrained(ckpt, dtype=torch.float32)
    ref.set_progress_bar_config(disable=True)

    def run_diffusers():
        g = torch.Generator("cpu").manual_seed(seed)
        return np.asarray(ref(PROMPT, height=size, width=size, num_inference_steps=steps, guidance_scale=0.0,
                              generator=g).images[0])

    rows = {}
    times, reference = timed(run_diffusers, args.repeats)
    rows["diffusers eager fp32"] = (times, 0)
    for backend in ("onnxruntime", "torch"):
        pipe = Pipeline(out, backend)
        times, image = timed(lambda: np.asarray(pipe(PROMPT, size, size, steps, seed, progress=False)[0]),
                             args.repeats)
        rows[f"zimage-deploy {backend} fp32"] = (times, int(np.abs(image.astype(int) - reference).max()))

    machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch threads {torch.get_num_threads()}"
    import onnxruntime

    lines = [
        f"# Tiny Z-Image-Turbo end to end, {size}x{size}, {steps} steps, batch 1",
        "",
        f"Date {dt.date.today()}, {machine}; torch {torch.__version__}, onnxruntime {onnxruntime.__version__}, "
        f"diffusers {__import__('diffusers').__version__}. Median / p90 of {args.repeats} runs after one warm-up; "
        "includes prompt encoding and VAE decode.",
        "",
        "| pipeline | median s | p90 s | speed-up vs diffusers | max abs diff vs diffusers (0-255) |",
        "|---|---|---|---|---|",
    ]
    base = statistics.median(rows["diffusers eager fp32"][0])
    result = {"size": size, "steps": steps, "date": str(dt.date.today()), "machine": machine, "rows": {}}
    for name, (times, diff) in rows.items():
        med = statistics.median(times)
        p90 = sorted(times)[max(0, int(round(0.9 * len(times))) - 1)]
        lines.append(f"| {name} | {med:.3f} | {p90:.3f} | {base / med:.2f}x | {diff} |")
        result["rows"][name] = {"median_s": med, "p90_s": p90, "times_s": times, "max_abs_diff": diff}
    text = "\n".join(lines)
    print(text)
    if args.report:
        args.report.mkdir(parents=True, exist_ok=True)
        stem = f"tiny-e2e-cpu-{size}-{dt.date.today()}"
        (args.report / f"{stem}.md").write_text(text + "\n")
        (args.report / f"{stem}.json").write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
