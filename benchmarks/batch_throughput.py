"""Throughput of `python -m zimage_deploy.batch` on the tiny Turbo fp32 build (ONNX Runtime, CPU): images/s for a few
`--batch-size` values and image sizes, the command as a user runs it (in-process, `--overwrite`), and optionally
the same job on a local Ray with two CPU actors. A benchmark, not a test.

    .venv/bin/python benchmarks/batch_throughput.py [--images 32] [--steps 8] [--sizes 64,256] \\
        [--batch-sizes 1,2,4] [--repeats 3] [--ray] [--report benchmarks/reports/batch-cpu-DATE.md]

Two figures per row: the command's images/s (wall time of the whole command: reading, planning, loading the
runtime, generating, writing), and the generation images/s (the runtime calls only: the sum of each image's share
of its call, from results.jsonl).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

PROMPTS = ["a red fox in the snow, watercolor", "一只橘猫在窗台上晒太阳", "a lighthouse at dusk",
           "a poster of a bicycle, flat colours", "a teapot on a wooden table, studio light",
           "a mountain lake at dawn", "an astronaut riding a horse", "a city street in the rain, neon"]


def run_job(engine_dir: Path, src: Path, out: Path, batch_size: int, extra=()) -> dict:
    from zimage_deploy.batch.job import main

    t0 = time.perf_counter()
    rc = main(["--engine-dir", str(engine_dir), "--input", str(src), "--out", str(out), "--batch-size",
               str(batch_size), "--overwrite", "--no-progress", *extra])
    wall = time.perf_counter() - t0
    assert rc == 0, f"the batch job failed ({rc})"
    records = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    generation = sum(r["seconds"] for r in records)
    return {"images": len(records), "wall_s": wall, "images_per_s": len(records) / wall,
            "generation_images_per_s": len(records) / generation,
            "mean_batch": statistics.mean(r["batch_size"] for r in records)}


def versions() -> dict:
    import onnxruntime
    import torch

    out = {"python": platform.python_version(), "torch": torch.__version__, "onnxruntime": onnxruntime.__version__}
    try:
        import ray

        out["ray"] = ray.__version__
    except ImportError:
        pass
    return out


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--engine-dir", type=Path, default=None, help="default: build the tiny fp32 model in a temp dir")
    ap.add_argument("--images", type=int, default=32)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--sizes", default="64,256")
    ap.add_argument("--batch-sizes", default="1,2,4")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--ray", action="store_true", help="also the largest size and batch on Ray, 2 CPU actors")
    ap.add_argument("--report", type=Path, default=None)
    args = ap.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="batch-bench-"))
    engine_dir = args.engine_dir
    if engine_dir is None:
        from zimage_deploy import build

        engine_dir = tmp / "tiny-fp32"
        assert build.main(["--model", "tiny", "--target", "cpu", "--precision", "fp32", "--out",
                           str(engine_dir)]) == 0
    load_start = os.getloadavg()[0]
    rows = []
    sizes = [int(s) for s in args.sizes.split(",")]
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    for size in sizes:
        src = tmp / f"in-{size}.jsonl"
        src.write_text("".join(json.dumps({"prompt": PROMPTS[i % len(PROMPTS)], "seed": i, "steps": args.steps,
                                           "height": size, "width": size}) + "\n" for i in range(args.images)))
        for bs in batch_sizes:
            runs = [run_job(engine_dir, src, tmp / f"out-{size}-{bs}", bs) for _ in range(args.repeats)]
            best = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
            rows.append({"size": size, "batch_size": bs, "mode": "local", **best})
            print(rows[-1])
    if args.ray:
        import ray

        size, bs = sizes[-1], batch_sizes[-1]
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
        try:
            r = run_job(engine_dir, tmp / f"in-{size}.jsonl", tmp / "out-ray", bs, ["--ray", "--actors", "2"])
        finally:
            ray.shutdown()
        rows.append({"size": size, "batch_size": bs, "mode": "ray, 2 CPU actors", **r})
        print(rows[-1])

    meta = {"date": dt.date.today().isoformat(), "cpu": cpu_name(), "cores": os.cpu_count(), **versions(),
            "images": args.images, "steps": args.steps, "repeats": args.repeats,
            "load_average": [round(load_start, 2), round(os.getloadavg()[0], 2)]}
    text = report(meta, rows)
    print(text)
    if args.report:
        args.report.parent.mkdir(parents=True, exist_ok=True)
        args.report.write_text(text)
        args.report.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")


def report(meta: dict, rows: list[dict]) -> str:
    lines = [f"# Batch command throughput, tiny Turbo fp32 (ONNX Runtime), CPU, {meta['steps']} steps",
             "",
             f"Date {meta['date']}, {meta['cpu']}, {meta['cores']} cores; Python {meta['python']}, torch "
             f"{meta['torch']}, onnxruntime {meta['onnxruntime']}" + (f", ray {meta['ray']}" if "ray" in meta else "")
             + f". {meta['images']} images per job (8 prompts, one seed each), median of {meta['repeats']} runs "
             f"(Ray: one run). 1-minute load average {meta['load_average'][0]} at the start, "
             f"{meta['load_average'][1]} at the end (other jobs share these cores: compare rows, not machines).",
             "",
             "| size | --batch-size | mode | mean batch | command images/s | generation images/s | command wall s |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['size']}x{r['size']} | {r['batch_size']} | {r['mode']} | {r['mean_batch']:.2f} | "
                     f"{r['images_per_s']:.2f} | {r['generation_images_per_s']:.2f} | {r['wall_s']:.2f} |")
    lines += ["",
              "Command images/s: the whole command (reading, checking, loading the runtime, generating, writing PNGs "
              "and results.jsonl). Generation images/s: the runtime calls only (on Ray: per actor, the actors run "
              "side by side). The tiny model has random weights and a 64-wide DiT: these figures measure the "
              "batch machinery and ONNX Runtime on this CPU, not Z-Image's real cost. The Ray row includes "
              "starting a local Ray and two actors, each loading the build, on the same two cores.", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
