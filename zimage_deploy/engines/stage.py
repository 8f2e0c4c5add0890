"""The engines stage: one TensorRT engine per component, kept where its key (ONNX hash, flavour, version, SM,
profile, options) is unchanged and its plan file is intact. With run-time LoRA capacity (`--max-lora-rank`), the
DiT components' engines are built from their graphs with the LoRA side branch (`job.lora_branch`: the factors are
engine inputs of fixed shape, recorded in the engine's entry as `lora_branch`)."""

from __future__ import annotations

import time
from dataclasses import replace

from tqdm import tqdm

from .. import manifest as manifest_io
from ..buildfolder import BuildFolder
from ..hashing import file_sha256
from ..manifest import Engine, read_component
from .builder import release_torch_memory


def engines_stage(job, manifest: dict) -> dict:
    """Build what is not up to date; returns the stage's manifest record. `job.drop_intermediate`: each graph whose
    plan holds its weights is deleted once the plan is written (the TensorRT runtime reads plans only; a rebuild
    exports again)."""
    builder, out, log = job.engine_builder, job.out, job.log
    if builder is None:
        reason = ("target cpu runs the ONNX graphs with ONNX Runtime (or the Torch backend)"
                  if job.t.flavour == "none"
                  else "--skip-engines: run the build again without it where the target's TensorRT is installed")
        log(f"[engines] skipped: {reason}")
        return {"status": "skipped", "reason": reason}
    t0 = time.perf_counter()
    release_torch_memory()  # calibration and the quality gate may have left CUDA memory in torch's cache
    bar = tqdm(job.v.components, desc=f"engines ({builder.target.flavour} {builder.target.sm})", unit="engine",
               leave=False)
    folder = BuildFolder(out)
    for name in bar:
        bar.set_postfix_str(name)
        comp = manifest["components"][name]
        branch = job.lora_branch(name, comp)  # DiT graphs with the LoRA side branch (lora/tensorrt.py), or None
        profile = job.engine_shapes[name] if branch is None else {**job.engine_shapes[name], **branch.profile}
        rel = None if branch is None else BuildFolder.branch_graph_rel(comp["onnx"])
        key = builder.key(comp["onnx_sha256"], profile, branch=branch is not None)
        typed = read_component(comp, name)
        old = typed.engine or Engine()
        plan = folder.plan(name)
        if old.key == key and old.complete and plan.is_file() and file_sha256(plan) == old.plan_sha256:
            log(f"[engines] {name}: up to date, skipped")
            if job.drop_intermediate and not old.stripped and not typed.dropped:
                _drop(folder, comp, rel, log, name)
                manifest_io.save(out, manifest)
            continue
        comp["engine"] = None
        graph = folder.file(comp["onnx"]) if branch is None else branch.write(folder.file(rel))
        entry = builder.build(graph, profile, plan, strip=builder.strips(bool(typed.external_data)))
        extra = {} if branch is None else {"lora_branch": {**branch.record, "graph": rel}}
        entry = replace(entry, plan=BuildFolder.plan_rel(name), key=key, status="complete", extra=extra)
        comp["engine"] = entry.to_dict()
        manifest_io.save(out, manifest)
        if job.drop_intermediate and not entry.stripped:
            _drop(folder, comp, rel, log, name)
            manifest_io.save(out, manifest)
        log(f"[engines] {name}: {entry.plan} ({entry.bytes / 1e6:.1f} MB, {entry.build_seconds:.1f} s, "
            f"{entry.flavour} {entry.version} {builder.target.sm})")
    return {"status": "done", "seconds": round(time.perf_counter() - t0, 2)}


def _drop(folder: BuildFolder, comp: dict, branch_rel: str | None, log, name: str) -> None:
    """--drop-intermediate: the graph, and the graph with the LoRA branch the engine was built from."""
    folder.drop_graph(comp, log, name)
    if branch_rel is not None:
        folder.drop_graph({"onnx": branch_rel}, log, f"{name} (LoRA branch)")
