"""Real-size quantization on this machine: the build's export + quantize stages on a random checkpoint of the real
Z-Image-Turbo configs (6.15B DiT, Qwen3-4B), each run in its own process under GNU time (wall time, peak RSS),
and the on-disk size of every quantized graph. Engines and the quality gate are skipped (no GPU here; the
gate would run the 6B model at full size on the CPU). A benchmark, not a test: it writes ~20 GB of checkpoint and
~35 GB of graphs.

    .venv/bin/python benchmarks/quantize_realsize.py --work /data/zimage-q [--runs int4-rtn,fp8,int4-awq,nvfp4]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from export_memory import du, machine, measured, stage_table  # noqa: E402

# calibration on the CPU runs the 6B DiT in BF16 at 256x256 for a few steps: enough for the scales' shapes and
# the memory/time of the path; the figures of a GPU calibration (64 prompts, 1024x1024, 8 steps) are another run
RUNS = {
    "int4-rtn": ["--precision", "int4", "--int4-method", "rtn"],
    "fp8": ["--precision", "fp8", "--calib-size", "1", "--calib-steps", "2", "--calib-side", "256"],
    "int4-awq": ["--precision", "int4", "--calib-size", "1", "--calib-steps", "1", "--calib-side", "256"],
    # NVFP4 is for Blackwell: the rtx5090 target (same BF16 base graphs); its text encoder INT4 by round to nearest
    "nvfp4": ["--target", "rtx5090", "--precision", "nvfp4", "--int4-method", "rtn", "--calib-size", "1",
              "--calib-steps", "2", "--calib-side", "256"],
}


def main() -> None:
    from zimage_deploy.buildfolder import BuildFolder

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--work", type=Path, required=True)
    ap.add_argument("--runs", default="int4-rtn,fp8")
    ap.add_argument("--report", type=Path, default=Path(__file__).parent / "reports")
    args = ap.parse_args()
    py = sys.executable
    ckpt, out = args.work / "ckpt", args.work / "build"
    stages, sizes, quant = {}, {}, {}
    if not (ckpt / "model_index.json").is_file():
        stages["write checkpoint (bf16)"] = measured([py, "-m", "zimage_deploy.realsize", "--out", str(ckpt)])
    for run in [r for r in args.runs.split(",") if r]:  # --runs "": re-render the day's report
        cmd = [py, "-m", "zimage_deploy.build", "--model", str(ckpt), "--target", "rtx4090", "--lean", "on",  # a run's
               # own --target comes later and wins
               "--skip-engines", "--skip-parity", "--no-quality-gate", "--out", str(out), *RUNS[run]]
        stages[f"build {run} (export when not up to date + quantize)"] = measured(cmd)
        manifest = json.loads((out / "manifest.json").read_text())
        sizes[run] = {n: round(du(BuildFolder(out).file(c["onnx"]).parent), 2)
                      for n, c in manifest["components"].items()
                      if n in ("transformer", "context_refiner", "text_encoder")}
        quant[run] = {n: {k: c["quantization"][k] for k in ("method", "layers", "activation_qdq", "awq_scaled",
                                                              "weight_bytes", "calibration")}
                      for n, c in manifest["components"].items() if c.get("quantization")}
    report = {"date": str(dt.date.today()), "machine": machine(), "stages": stages, "sizes_gib": sizes,
              "quantization": quant}
    stem = f"quantize-realsize-{report['date']}"
    earlier = args.report / f"{stem}.json"
    if earlier.is_file():  # runs of the same day accumulate in one report (each run is its own process)
        old = json.loads(earlier.read_text())
        for k in ("stages", "sizes_gib", "quantization"):
            report[k] = {**old.get(k, {}), **report[k]}
    stages, sizes = report["stages"], report["sizes_gib"]
    lines = stage_table(f"Real-size quantization ({report['date']}, {report['machine']})",
                        "Random weights of the real Z-Image-Turbo configs; target rtx4090 (nvfp4: rtx5090; BF16 base "
                        "graphs), lean "
                        "export, engines and quality gate skipped. Each build in its own process; peak RSS from "
                        "GNU time.", stages)
    lines += ["", "| run | component | graph on disk GiB |", "|---|---|---|"]
    lines += [f"| {run} | {n} | {g} |" for run, d in sizes.items() for n, g in d.items()]
    lines += ["", "| run | component | method | layers (quantized activations / AWQ) | weights GB before -> after | "
              "calibration |", "|---|---|---|---|---|---|"]
    for run, comps in report["quantization"].items():
        for n, q in comps.items():
            cal = q["calibration"]
            cal = (f"{cal['count']} prompt(s), {cal['size'][0]}², {cal['steps']} steps, {cal['seconds']} s"
                   if cal else "none (round to nearest)")
            wb = q["weight_bytes"]
            lines.append(f"| {run} | {n} | {q['method']} | {q['layers']} ({q['activation_qdq']} / {q['awq_scaled']}) "
                         f"| {wb['before'] / 1e9:.2f} -> {wb['after'] / 1e9:.2f} | {cal} |")
    args.report.mkdir(parents=True, exist_ok=True)
    (args.report / f"{stem}.json").write_text(json.dumps(report, indent=2) + "\n")
    (args.report / f"{stem}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
