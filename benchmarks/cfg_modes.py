"""Classifier-free guidance as one batch-2 transformer call per step vs two batch-1 calls, on the tiny Base
model, same process, same request. A benchmark, not a test.

    .venv/bin/python benchmarks/cfg_modes.py [--sizes 256 512] [--steps 8] [--repeats 5]
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import statistics
import time

import torch

from zimage_deploy import build as build_mod
from zimage_deploy.runtime.pipeline import Pipeline


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", type=int, nargs="+", default=[256, 512])
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    out = build_mod.default_out("tiny-base", "base", "cpu", "fp32")
    build_mod.build("tiny-base", "base", "cpu", "fp32", out, log=lambda *_: None)
    print(f"# CFG batch-2 vs two calls, tiny Base, {args.steps} steps, guidance 4, {dt.date.today()}, "
          f"{os.cpu_count()} CPU cores, torch {torch.__version__}\n")
    print("| backend | size | batch-2 median s | two calls median s | faster |")
    print("|---|---|---|---|---|")
    for backend in ("onnxruntime", "torch"):
        for size in args.sizes:
            med = {}
            for mode in ("batch", "sequential"):
                pipe = Pipeline(out, backend, cfg_mode=mode)
                run = lambda: pipe("a castle", size, size, args.steps, 0, guidance_scale=4.0,  # noqa: E731
                                   negative_prompt="blurry", progress=False)
                run()
                times = []
                for _ in range(args.repeats):
                    t0 = time.perf_counter()
                    run()
                    times.append(time.perf_counter() - t0)
                med[mode] = statistics.median(times)
            faster = "batch-2" if med["batch"] < med["sequential"] else "two calls"
            print(f"| {backend} | {size} | {med['batch']:.3f} | {med['sequential']:.3f} | {faster} |")


if __name__ == "__main__":
    main()
