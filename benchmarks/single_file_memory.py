"""Peak RSS of the memory-lean export from a real-size *single file* (issue 29): a random 6.15B Z-Image DiT written
as one original-layout BF16 file (~11.5 GB, `model.diffusion_model.` prefix, fused qkv), built with
`--base` (a random diffusers folder of the real widths for the text encoder, VAE, tokenizer and scheduler: its
text encoder 3 layers deep and its DiT a one-layer stand-in, unused, so the measurement is the DiT file's) on the
lean path. The DiT file's values are windows of one pool of small normals (tiny_files.pooled_random): disk speed. Each stage in its own process under GNU time. Writes a Markdown
and a JSON report; deletes the multi-GB files unless --keep.

    .venv/bin/python benchmarks/single_file_memory.py --work /data/zimage-single [--keep]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shutil
import sys
from pathlib import Path

from export_memory import du, machine, measured, stage_table

LIMIT_GIB = 8.0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--work", type=Path, required=True)
    ap.add_argument("--keep", action="store_true")
    args = ap.parse_args()
    py, work = sys.executable, args.work
    work.mkdir(parents=True, exist_ok=True)
    base, dit, out = work / "base", work / "z_image_turbo_random_bf16.safetensors", work / "export-bf16"
    os.environ["ZIMAGE_DEPLOY_CACHE"] = str(work / "cache")  # the view and remembered hashes, removed with the rest
    stages = {}
    if not (base / "model_index.json").is_file():
        stages["write base folder (3-layer real-width text encoder, VAE; 1-layer DiT stand-in)"] = measured(
            [py, "-c", "from zimage_deploy.realsize import write_real_size; "
                       f"write_real_size({str(base)!r}, dit=dict(n_layers=1, n_refiner_layers=1), "
                       "text=dict(num_hidden_layers=3))"])
    stages["write the single DiT file (streamed)"] = measured(
        [py, "-c", "from zimage_deploy.realsize import REAL_DIT; "
                   "from zimage_deploy.tiny_files import write_random_original_dit; "
                   f"write_random_original_dit({str(dit)!r}, REAL_DIT)"])
    stages["lean export from the single file + --base (bf16)"] = measured(
        [py, "-m", "zimage_deploy.build", "--model", str(dit), "--base", str(base), "--target", "cpu",
         "--precision", "bf16", "--lean", "on", "--skip-parity", "--out", str(out)])
    manifest = json.loads((out / "manifest.json").read_text())
    peak = stages["lean export from the single file + --base (bf16)"]["peak_rss_gib"]
    report = {"date": str(dt.date.today()), "machine": machine(), "stages": stages,
              "single_file_gib": round(dit.stat().st_size / 2**30, 2),
              "graphs_gib": {n: round(c["bytes"] / 2**30, 2) for n, c in manifest["components"].items()},
              "lean": manifest["export"]["lean"], "sources": manifest["model"]["sources"]["sources"],
              "limit_gib": LIMIT_GIB, "within_limit": peak <= LIMIT_GIB}
    lines = stage_table(f"Real-size single-file export memory ({report['date']}, {report['machine']})",
                        "A random 6.15B Z-Image DiT as one original-layout BF16 file (the ComfyUI / original key "
                        "layout, `model.diffusion_model.` prefix), exported on the lean path with the rest from "
                        "--base. Each stage runs in its own process; peak RSS from GNU time.", stages)
    lines += ["", f"Single file: {report['single_file_gib']} GiB. ONNX (bf16), GiB: "
              + ", ".join(f"{k} {v}" for k, v in report["graphs_gib"].items()),
              "", f"Lean export peak {peak} GiB, limit {LIMIT_GIB} GiB: "
              f"{'within' if report['within_limit'] else 'OVER'}."]
    reports = Path(__file__).resolve().parent / "reports"
    stem = f"single-file-memory-{report['date']}"
    (reports / f"{stem}.json").write_text(json.dumps(report, indent=2) + "\n")
    (reports / f"{stem}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"disk: work folder {du(work):.1f} GiB")
    if not args.keep:
        shutil.rmtree(work)


if __name__ == "__main__":
    main()
