"""The export stage: one ONNX graph per component of the variant, skipped where the previous build's graph was made
from the same inputs (checkpoint hash, precision, exporter versions, fused LoRAs, ControlNet) and is intact."""

from __future__ import annotations

import hashlib
import time
from pathlib import Path

import torch
from tqdm import tqdm

from .. import __version__
from .. import manifest as manifest_io
from ..buildfolder import CHECKPOINT, BuildFolder
from ..checkpoint import weight_bytes
from ..components import loader_of
from ..hashing import folder_sha256
from ..targets import QUANTIZED, base_precision
from .onnx_export import EXPORT_FORMAT, OPSET, export_component
from .specs import describe_io, specs_for

COMPUTE = {"fp32": torch.float32, "bf16": torch.bfloat16}
LEAN_AUTO_BYTES = 4 << 30


def use_lean(lean: str, ckpt: Path) -> bool:
    """`auto`: lean when the DiT and text-encoder weights together exceed 4 GiB."""
    if lean in ("on", "off"):
        return lean == "on"
    size = sum(weight_bytes(ckpt / f) for f in ("transformer", "text_encoder"))
    return size > LEAN_AUTO_BYTES


def component_key(model_sha: str, name: str, precision: str, dit: str = "") -> str:
    """What a component's exported graph is made from; `dit`: what fused LoRAs and a ControlNet add (dit_key)."""
    fused = f"|lora:{dit}" if dit else ""
    payload = f"{model_sha}|{name}|{precision}|{OPSET}|{EXPORT_FORMAT}|{__version__}{fused}"
    return hashlib.sha256(payload.encode()).hexdigest()


def dit_key(job, name: str) -> str:
    """What the build's fused LoRAs and ControlNet add to a component's up-to-date key."""
    return job.loras.key_for(name) + (job.controlnet.key_for(name) if job.controlnet else "")


# the checkpoint folders a component's graph is made from (a component not listed: the whole checkpoint)
FOLDERS = {"transformer": ("transformer",), "text_encoder": ("text_encoder",), "vae_decoder": ("vae",),
           "vae_encoder": ("vae",), "vision_encoder": ("siglip", "siglip_processor")}


def part_sha(model: dict, name: str) -> str:
    """What a component's graph is made from: the hash of its own checkpoint folders (a new DiT file keeps the text
    encoder's and VAE's graphs), or the whole checkpoint's where the manifest has no part hashes."""
    parts, folders = model.get("parts") or {}, FOLDERS.get(loader_of(name))
    if not folders or any(f not in parts for f in folders):
        return model["sha256"]
    return hashlib.sha256("|".join(parts[f] for f in folders).encode()).hexdigest()


def _key(job, model: dict, name: str) -> str:
    return component_key(part_sha(model, name), name, base_precision(job.plan[name], job.t.base), dit_key(job, name))


def kept_components(job, model: dict) -> dict:
    """Components of the previous build in the folder whose exported graph was made from the same inputs and is
    intact (a quantized component keeps its quantized graph only if the quantize stage finds it up to date too)."""
    kept = {}
    for name in job.v.components:
        old = job.previous.get("components", {}).get(name, {})
        exported = old.get("unquantized", old)
        if not job.graphs:  # a graphless build keeps a record made from the same inputs (its quantization is
            if old.get("source") == CHECKPOINT and old.get("key") == _key(job, model, name) \
                    and old.get("status") in ("complete", "rejected") and job.plan[name] in QUANTIZED:
                kept[name] = old  # checked by the quantize stage); an unquantized one is recorded anew (cheap)
            continue
        folder = BuildFolder(job.out).graph_dir(name)
        if old.get("key") == _key(job, model, name) and exported.get("onnx") == BuildFolder.graph_rel(name) \
                and old.get("status") in ("complete", "rejected") and old.get("rejected_by") != "parity" \
                and folder.is_dir() and folder_sha256(folder) == exported.get("onnx_sha256"):
            if job.plan[name] in QUANTIZED:
                kept[name] = old
            else:  # no longer quantized: back to the exported graph
                back = {k: v for k, v in {**old, **exported}.items() if k not in ("unquantized", "quantization")}
                kept[name] = {**back, "status": "complete"}
    return kept


def export_stage(job, manifest: dict) -> dict:
    """Export what is not up to date; returns the stage's manifest record (`manifest["export"]` says whether the
    export was lean)."""
    t0 = time.perf_counter()
    if not job.graphs:
        return _record_graphless(job, manifest)
    out, comps, lean = job.out, job.v.components, use_lean(job.lean, job.ckpt)
    manifest["export"] = {"lean": lean}
    bar = tqdm(comps, desc="export", unit="graph", leave=False)
    for name in bar:
        bar.set_postfix_str(name)
        exported = base_precision(job.plan[name], job.t.base)
        key = _key(job, manifest["model"], name)
        if name in manifest["components"]:
            job.log(f"[export] {name}: up to date, skipped")
            continue
        compute = COMPUTE[exported]
        if lean and job.modules.has_template(name):
            template, depth = job.modules.template(name, compute)
            entry = export_component(name, template, job.facts, compute, BuildFolder(out).graphs, job.v.name,
                                     weights=job.modules.weights(name), depth=depth)
        else:
            entry = export_component(name, job.modules.module(name, compute), job.facts, compute,
                                     BuildFolder(out).graphs, job.v.name)
        if lean:
            job.modules.keep_only(comps[comps.index(name) + 1:])
        # an engine of the previous build stays a candidate: its key (graph hash included) decides if it is current
        entry.update(key=key, precision=exported, status="complete",
                     engine=job.previous.get("components", {}).get(name, {}).get("engine"))
        manifest["components"][name] = entry
        manifest_io.save(out, manifest)
        job.log(f"[export] {name}: {entry['onnx']} ({entry['bytes'] / 1e6:.1f} MB, opset {OPSET})")
    return {"status": "done", "seconds": round(time.perf_counter() - t0, 2)}


def _record_graphless(job, manifest: dict) -> dict:
    """A build for the compiled Torch runtime without graphs (build.py `_graphless`): each component's record holds
    its I/O (named dims, what the runtime's backends cast and bucket by) and the key of what it is made from, no
    graph; the runtime loads the modules from the checkpoint the manifest records."""
    manifest["export"] = {"lean": False, "graphs": False}
    specs = specs_for(job.v.name, job.facts)
    for name in job.v.components:
        if name in manifest["components"]:
            continue
        exported = base_precision(job.plan[name], job.t.base)
        manifest["components"][name] = {
            **describe_io(specs[name], job.facts, COMPUTE[exported]), "source": CHECKPOINT,
            "key": _key(job, manifest["model"], name), "precision": exported, "status": "complete", "engine": None}
    manifest_io.save(job.out, manifest)
    reason = ("no ONNX graphs: the compiled Torch runtime loads the checkpoint (build --graphs on makes them, for "
              "ONNX Runtime or for engines built where TensorRT is)")
    job.log(f"[export] skipped: {reason}")
    return {"status": "skipped", "reason": reason}
