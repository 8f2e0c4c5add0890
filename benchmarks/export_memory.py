"""Peak RSS and wall time of each real-size stage, each in its own process (so each peak is its own):
write the random real-size checkpoint, the memory-lean export of all Turbo components, and the layer-by-layer
weight-only INT4 / FP8 quantization of the DiT and text-encoder graphs. Writes a Markdown
and a JSON report. A benchmark, not a test (it writes ~20 GB of checkpoint and ~20 GB of graphs per precision).

    .venv/bin/python benchmarks/export_memory.py --work /data/zimage-mem --precisions bf16 [--keep]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import re
import shutil
import subprocess
import sys
from pathlib import Path


def measured(cmd: list[str]) -> dict:
    """Run `cmd` under GNU time: wall seconds and peak RSS (GiB) of that process tree's largest process."""
    r = subprocess.run(["/usr/bin/time", "-v", *cmd], capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{r.stdout[-2000:]}\n{r.stderr[-4000:]}")
    peak_kb = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", r.stderr).group(1))
    wall = re.search(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): ([\d:.]+)", r.stderr).group(1)
    seconds = sum(float(x) * 60**i for i, x in enumerate(reversed(wall.split(":"))))
    return {"seconds": round(seconds, 1), "peak_rss_gib": round(peak_kb / 2**20, 2)}


def structure_check(ckpt: Path, out: Path, manifest: dict) -> dict:
    """Real-size graphs against the checkpoint without loading weights: checker on the path, every weight
    once under its name with the right byte count (shapes from safetensors headers), dynamic dims as
    declared in the manifest."""
    import numpy as np
    import onnx
    import torch
    from safetensors import safe_open

    from zimage_deploy.buildfolder import BuildFolder
    from zimage_deploy.models.dit import iter_fused
    from zimage_deploy.models.text_encoder import TextEncoderConfig, iter_converted

    def shapes(folder):
        for file in sorted(folder.glob("*.safetensors")):
            with safe_open(str(file), framework="pt") as f:
                for k in f.keys():
                    yield k, torch.empty(f.get_slice(k).get_shape(), device="meta")

    cfg = TextEncoderConfig.from_transformers(json.loads((ckpt / "text_encoder" / "config.json").read_text()))
    expected = {"dit": {k: v.numel() for k, v in iter_fused(shapes(ckpt / "transformer"))},
                "text": {k: v.numel() for k, v in iter_converted(shapes(ckpt / "text_encoder"), cfg.used_layers)}}
    result, got = {}, {"dit": {}, "text": {}}
    for comp, group in (("transformer", "dit"), ("context_refiner", "dit"), ("text_encoder", "text")):
        path = BuildFolder(out).file(manifest["components"][comp]["onnx"])
        onnx.checker.check_model(str(path))
        graph = onnx.load(str(path), load_external_data=False).graph
        for t in graph.initializer:
            got[group][t.name] = int(np.prod(t.dims))
        dims = {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in graph.input}
        declared = {io["name"]: io["dims"] for io in manifest["components"][comp]["inputs"]}
        result[f"{comp} dims as declared"] = dims == declared
    for group in ("dit", "text"):
        result[f"{group} weights: names match checkpoint"] = set(got[group]) == set(expected[group])
        result[f"{group} weights: element counts match"] = got[group] == expected[group]
        result[f"{group} weights: count"] = len(got[group])
    return result


def machine() -> str:
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return f"{platform.machine()}, {os.cpu_count()} cores, {ram:.0f} GiB RAM"


def stage_table(title: str, intro: str, stages: dict) -> list[str]:
    """Markdown: a title, a paragraph, and one row per measured stage."""
    lines = [f"# {title}", "", intro, "", "| stage | wall s | peak RSS GiB |", "|---|---|---|"]
    return lines + [f"| {k} | {v['seconds']} | {v['peak_rss_gib']} |" for k, v in stages.items()]


def du(path: Path) -> float:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) / 2**30


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--work", type=Path, required=True)
    ap.add_argument("--precisions", default="bf16", help="comma-separated: bf16, fp32")
    ap.add_argument("--keep", action="store_true", help="keep the checkpoint and graphs")
    ap.add_argument("--quantize", default="int4,fp8", help="weight-only schemes to apply to each export ('' none)")
    args = ap.parse_args()
    py = sys.executable
    ckpt, stages, checks = args.work / "checkpoint", {}, {}
    args.work.mkdir(parents=True, exist_ok=True)
    if not (ckpt / "model_index.json").is_file():
        stages["write checkpoint (bf16)"] = measured([py, "-m", "zimage_deploy.realsize", "--out", str(ckpt)])
    sizes = {"checkpoint": {f: round(du(ckpt / f), 2) for f in ("transformer", "text_encoder", "vae")}}
    for precision in args.precisions.split(","):
        out = args.work / f"export-{precision}"
        stages[f"lean export, all components ({precision})"] = measured(
            [py, "-m", "zimage_deploy.build", "--model", str(ckpt), "--target", "cpu", "--precision", precision,
             "--lean", "on", "--skip-parity", "--out", str(out)])
        manifest = json.loads((out / "manifest.json").read_text())
        sizes[precision] = {n: round(c["bytes"] / 2**30, 2) for n, c in manifest["components"].items()}
        checks[precision] = structure_check(ckpt, out, manifest)
        from zimage_deploy.buildfolder import BuildFolder

        for scheme in args.quantize.split(",") if args.quantize else []:
            for comp in ("transformer", "text_encoder"):
                dst = args.work / f"{comp}-{precision}-{scheme}"
                stages[f"round-to-nearest {scheme} of {comp} ({precision} graph)"] = measured(
                    [py, "-m", "zimage_deploy.quantize.qdq", str(BuildFolder(out).graph_dir(comp)), str(dst),
                     "--scheme", scheme])
                sizes[f"{precision}+{scheme}"] = {**sizes.get(f"{precision}+{scheme}", {}),
                                                  comp: round(du(dst), 2)}
                shutil.rmtree(dst)
        if not args.keep:
            shutil.rmtree(out)
    report = {"date": str(dt.date.today()), "machine": machine(), "stages": stages, "sizes_gib": sizes,
              "structure_checks": checks}
    lines = stage_table(f"Real-size export memory ({report['date']}, {report['machine']})",
                        "Random weights of the real Z-Image-Turbo configs (6.15B DiT, Qwen3-4B text encoder, "
                        "Flux VAE). Each stage runs in its own process; peak RSS from GNU time.", stages)
    lines += ["", "| artifact | " + " | ".join(sizes["checkpoint"]) + " |", "|---|---|---|---|"]
    lines += ["| checkpoint (bf16 safetensors), GiB | " + " | ".join(str(v) for v in sizes["checkpoint"].values())
              + " |"]
    for key, value in sizes.items():
        if key != "checkpoint":
            lines += ["", f"ONNX ({key}), GiB: " + ", ".join(f"{k} {v}" for k, v in value.items())]
    for precision, c in checks.items():
        lines += ["", f"Structure ({precision}): " + "; ".join(f"{k}: {v}" for k, v in c.items())]
    text = "\n".join(lines) + "\n"
    print(text)
    (args.work / "export_memory.md").write_text(text)
    (args.work / "export_memory.json").write_text(json.dumps(report, indent=2) + "\n")
    if not args.keep:
        shutil.rmtree(ckpt)


if __name__ == "__main__":
    main()
