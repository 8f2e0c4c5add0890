"""The build's quantize stage: calibrate (modelopt, the real sampling loop), write Q/DQ graphs, gate on quality.

Reads the exported graphs and the manifest; writes, per quantized component, `quant/<component>.<scheme>.safetensors`
(the scales) and `onnx/<component>.<scheme>/` (the quantized graph), and points the component's manifest entry
at the quantized graph (the unquantized one stays, under "unquantized", for the gate and for rebuilds).
"""

from __future__ import annotations

import gc
import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path

from .. import __version__
from .. import manifest as manifest_io
from ..buildfolder import BuildFolder
from ..errors import InternalError, UserError
from ..facts import small_model
from ..hashing import file_sha256, folder_sha256
from ..lora.fuse import recorded_key
from ..scales import attention_layers_of, layers_of, save_scales
from ..schemes import SCHEMES, get_scheme
from ..targets import QUANTIZED
from .options import QuantOptions, prompts_sha256


# the options that change a quantized graph (the gate's do not)
MAKING = ("calib_prompts", "calib_size", "calib_side", "calib_steps", "int4_method", "int4_block", "exclude",
          "fp8_attention")


class GateFailed(UserError):
    pass


def int4_block(opts: QuantOptions, facts: dict) -> int:
    """128 (the deployment block); 32 for the small test checkpoints, whose widths are under 128."""
    return opts.int4_block or (32 if small_model(facts["dim"]) else 128)


def needs_data(precision: str, opts: QuantOptions) -> bool:
    """Whether quantizing to `precision` (any of the plan's, quantized or not) needs calibration data."""
    return precision in SCHEMES and SCHEMES[precision].needs_data(opts.int4_method)


def check_supported(plan: dict, variant, opts: QuantOptions | None = None) -> None:
    """`variant`: a variants.Variant (its components, and whether its calibration is supported); `opts`: the
    quantization options, whose `--calib-images` folder (Edit builds only) is read and checked here."""
    schemes = {plan[c] for c in variant.components if plan[c] in QUANTIZED}
    if schemes and not variant.quantizable:
        raise UserError(f"quantizing the {variant.name} variant is not supported yet; build it in bf16 / fp32")
    if opts is not None and opts.calib_images is not None:
        if variant.layout != "omni":
            raise UserError("--calib-images (condition images) is for Edit builds; this build's calibration takes "
                            "prompts only")
        from .edit_inputs import read_calib_images

        read_calib_images(opts.calib_images)


def _key(entry: dict, scheme: str, opts: QuantOptions, block: int, calib_sha: str | None, loras: str = "") -> str:
    made = {k: v for k, v in opts.as_dict().items() if k in MAKING}
    # what the quantized component is made from: its exported graph, or (graphless) the key of its checkpoint part
    made_from = entry["unquantized"].get("onnx_sha256") or entry["unquantized"]["key"]
    parts = [made_from, scheme, json.dumps(made, sort_keys=True), str(block),
             str(calib_sha), __version__] + ([f"lora:{loras}"] if loras else [])  # fused LoRAs: calibration saw them
    return hashlib.sha256("|".join(parts).encode()).hexdigest()


def quantize_stage(job, manifest: dict) -> dict:
    """Run the stage; returns its manifest record. `job.prompts`: the calibration prompts (empty when no scheme of
    the plan needs data; the build has checked the plan with `check_supported`). Raises GateFailed (after recording
    why) below the thresholds. `job.drop_intermediate`: the unquantized graphs are deleted afterwards (they only
    serve the quality gate and rebuilds)."""
    if any(p in QUANTIZED for p in job.plan.values()):
        manifest["quantize_options"] = job.quant.as_dict()
    record = _quantize(job, manifest)
    if record["status"] == "skipped":
        job.log(f"[quantize] skipped: {record['reason']}")
    elif job.drop_intermediate:
        for name, entry in manifest["components"].items():
            unq = entry.get("unquantized")
            if unq and "onnx" in unq and unq["onnx"] != entry["onnx"] and not unq.get("dropped"):
                BuildFolder(job.out).drop_graph(unq, job.log, f"{name} (unquantized)")
    return record


@dataclass(frozen=True)
class Calibration:
    """The data a build's quantized graphs are calibrated on, and so keyed by."""
    prompts: list[str]
    side: int  # image side calibrated at
    block: int  # the INT4 / NVFP4 block
    images: object | None  # the omni layout's condition images (quantize/edit_inputs.py CalibrationImages)
    sha256: str | None  # of the prompts (and images); None: no data
    loras: str  # the fused LoRAs' key: calibration saw them

    @classmethod
    def for_build(cls, job, manifest: dict) -> "Calibration":
        opts, prompts = job.quant, job.prompts
        side = opts.calib_side or manifest["defaults"]["height"]
        images = None
        if prompts and job.v.layout == "omni":
            from .edit_inputs import CalibrationImages

            images = CalibrationImages(side, opts.calib_images)
        sha = prompts_sha256(prompts) if prompts else None
        if images is not None:
            sha = hashlib.sha256(f"{sha}|{images.sha256}".encode()).hexdigest()
        return cls(prompts, side, int4_block(opts, manifest["model"]["facts"]), images, sha, recorded_key(manifest))

    def key(self, entry: dict, scheme: str, opts: QuantOptions) -> str:
        return _key(entry, scheme, opts, self.block, self.sha256, self.loras)

    def record(self, opts: QuantOptions, manifest: dict, seconds: float | None) -> dict:
        """The manifest's `calibration` of a component calibrated on this data."""
        return {"prompts": str(opts.calib_prompts or "shipped"), "count": len(self.prompts), "sha256": self.sha256,
                "size": [self.side, self.side], "steps": opts.calib_steps or manifest["defaults"]["steps"],
                "seconds": seconds, **({"condition_images": self.images.record(opts.calib_images)}
                                       if self.images else {})}


def _quantize(job, manifest: dict) -> dict:
    t0 = time.perf_counter()
    todo = {c: job.plan[c] for c in job.v.components if job.plan[c] in QUANTIZED}
    if not todo:
        return {"status": "skipped", "reason": f"precision {manifest['precision']} needs no quantization"}
    cal = Calibration.for_build(job, manifest)
    stale = _stale(job, manifest, todo, cal)
    scales, calib_seconds = _calibrate(job, manifest, todo, stale, cal)
    fp8_source = None
    dit_scheme = todo.get("transformer")
    if scales.get("transformer") is not None and dit_scheme and get_scheme(dit_scheme).reuses_fp8_files:
        # an FP8 single file's own grid
        from .reuse import choose

        fp8_source = choose(scales["transformer"], job.ckpt, fused_loras=bool(cal.loras))
    for name in stale:
        if job.graphs:
            _write_graph(job, manifest, name, todo[name], cal, scales, calib_seconds, fp8_source)
        else:
            _write_scales(job, manifest, name, todo[name], cal, scales, calib_seconds)

    record = {"status": "done", "components": todo, "seconds": None, "calibration_seconds": calib_seconds}
    if "vision_encoder" in job.v.components:  # the SigLIP tower: kept in the base precision, its share measured
        record["vision_encoder"] = _kept_share(manifest, "vision_encoder")
        job.log(f"[quantize] vision_encoder (SigLIP) kept in {record['vision_encoder']['precision']}: "
                f"{record['vision_encoder']['weight_bytes'] / 1e6:.1f} MB of weights, "
                f"{record['vision_encoder']['vs_transformer_unquantized']:.1%} of the DiT's unquantized weights; "
                "it runs once per condition image per request, not per step")
    for name in todo:  # intact graphs (a rejected one reused by a rebuild too) until the gate says otherwise
        manifest["components"][name]["status"] = "complete"
    manifest_io.save(job.out, manifest)
    record["quality_gate"] = _gate(job, manifest, todo, record, cal.side, t0)
    record["seconds"] = round(time.perf_counter() - t0, 2)
    return record


def _stale(job, manifest: dict, todo: dict[str, str], cal: Calibration) -> list[str]:
    """The components whose quantized graph is not up to date; the exported graph of each to quantize becomes its
    "unquantized" record (kept across rebuilds)."""
    for name in todo:
        entry = manifest["components"][name]
        if "unquantized" not in entry:
            kept = ("onnx", "onnx_sha256", "bytes", "weight_bytes", "precision") if job.graphs else ("key", "precision")
            entry["unquantized"] = {k: entry[k] for k in kept}
    stale = [n for n, s in todo.items()
             if not _up_to_date(job.out, manifest["components"][n], cal.key(manifest["components"][n], s, job.quant))]
    for name in todo:
        if name not in stale:
            job.log(f"[quantize] {name}: up to date, skipped")
    return stale


def _calibrate(job, manifest: dict, todo: dict[str, str], stale: list[str],
               cal: Calibration) -> tuple[dict[str, dict], float | None]:
    """The scales calibrated from data (component -> scales) and the seconds it took, where a stale component's
    scheme needs data; ({}, None) otherwise."""
    if not (stale and any(needs_data(todo[n], job.quant) for n in stale)):
        return {}, None
    from .models import calibrate_models

    tc = time.perf_counter()
    scales = calibrate_models(job, manifest, todo, cal)
    gc.collect()  # the calibrated models (held in modelopt's reference cycles) before the graph rewrite
    seconds = round(time.perf_counter() - tc, 2)
    job.log(f"[quantize] calibrated on {len(cal.prompts)} prompts at {cal.side}x{cal.side} in {seconds:.1f} s")
    return scales, seconds


def _write_graph(job, manifest: dict, name: str, scheme: str, cal: Calibration, scales: dict,
                 calib_seconds: float | None, fp8_source) -> None:
    """Quantize `name`'s unquantized graph to `scheme` (its calibrated `scales`, or round to nearest), save its
    scales, and point its manifest entry at the new graph."""
    from .qdq import quantize_graph

    opts, entry, folder = job.quant, manifest["components"][name], BuildFolder(job.out)
    src = folder.file(entry["unquantized"]["onnx"]).parent
    dst = folder.graph_dir(name, scheme)
    summary = quantize_graph(src, dst, scheme, cal.block, scales.get(name), opts.exclude)
    used = summary.pop("scales")
    scale_file = folder.scales(name, scheme)
    method = get_scheme(scheme).describe(calibrated=name in scales)
    save_scales(scale_file, used, {"scheme": scheme, "block": summary["block"], "component": name, "method": method})
    entry.update(
        onnx=BuildFolder.graph_rel(name, scheme), onnx_sha256=folder_sha256(dst), precision=scheme,
        status="complete",  # a previous engine stays a candidate: its key holds this graph's hash
        bytes=sum(p.stat().st_size for p in dst.iterdir()), weight_bytes=summary["bytes_after"],
        quantization={
            "key": cal.key(entry, scheme, opts), "scheme": scheme, "method": method,
            "block": summary["block"], "layers": len(summary["quantized"]),
            "activation_qdq": summary["activation_qdq"], "awq_scaled": summary["awq_scaled"],
            "attention_qdq": summary["attention_qdq"],
            **({"fp8_source": fp8_source} if fp8_source and name in ("transformer", "controlnet") else {}),
            "kept": summary["kept"], "exclude": list(opts.exclude),
            "weight_bytes": {"before": summary["bytes_before"], "after": summary["bytes_after"]},
            "scales": BuildFolder.scales_rel(name, scheme), "scales_sha256": file_sha256(scale_file),
            "calibration": cal.record(opts, manifest, calib_seconds) if name in scales else None,
        })
    manifest_io.save(job.out, manifest)
    before, after = summary["bytes_before"], summary["bytes_after"]
    act = get_scheme(scheme).activation_kind
    job.log(f"[quantize] {name}: {scheme}, {len(summary['quantized'])} layers ({summary['activation_qdq']} with "
            f"{act} activations, {summary['awq_scaled']} AWQ-scaled, {summary['attention_qdq']} FP8 attentions), "
            f"{len(summary['kept'])} 2-D weights kept; weights "
            f"{before / 1e6:.1f} MB -> {after / 1e6:.1f} MB ({after / before:.2f}x)")


def _write_scales(job, manifest: dict, name: str, scheme: str, cal: Calibration, scales: dict,
                  calib_seconds: float | None) -> None:
    """A graphless build (the compiled Torch runtime's): `name`'s calibrated scales are all it needs of the
    quantization (its FP8 matmuls take the calibrated weight and activation ranges as they are); no graph."""
    opts, entry, folder = job.quant, manifest["components"][name], BuildFolder(job.out)
    kind, calibrated = get_scheme(scheme), scales.get(name)
    if not calibrated:
        raise InternalError(f"{name}: no calibrated scales for the graphless {scheme} build")
    used = {k: kind.written_weight_amax(v) if k.endswith(".weight_amax") else v for k, v in calibrated.items()}
    scale_file = folder.scales(name, scheme)
    method, block = kind.describe(calibrated=True), kind.block(cal.block)
    save_scales(scale_file, used, {"scheme": scheme, "block": block, "component": name, "method": method})
    layers = layers_of(used)
    entry.update(precision=scheme, status="complete", quantization={
        "key": cal.key(entry, scheme, opts), "scheme": scheme, "method": method, "block": block,
        "layers": len(layers), "activation_qdq": sum(f"{n}.input_amax" in used for n in layers), "awq_scaled": 0,
        "attention_qdq": len(attention_layers_of(used)), "exclude": list(opts.exclude),
        "scales": BuildFolder.scales_rel(name, scheme), "scales_sha256": file_sha256(scale_file),
        "calibration": cal.record(opts, manifest, calib_seconds)})
    manifest_io.save(job.out, manifest)
    job.log(f"[quantize] {name}: {scheme}, {len(layers)} layers calibrated (scales only: the Torch runtime runs "
            "them as FP8 matmuls; no graph)")


def _gate(job, manifest: dict, todo: dict[str, str], record: dict, side: int, t0: float) -> dict:
    """The quality gate's record; below its thresholds the quantized components are rejected, the stage's
    `record` saved as failed, and GateFailed raised."""
    opts = job.quant
    if not opts.gate:
        return {"status": "skipped", "reason": "--no-quality-gate"}
    from .gate import run_gate

    gate = run_gate(job.out, manifest, opts.gate_prompts, side, opts.min_psnr, opts.min_cosine)
    verdict = "passed" if gate["passed"] else "FAILED"
    job.log(f"[quantize] quality gate {verdict}: PSNR min {gate['min_psnr_db']:.2f} dB (>= {opts.min_psnr}), "
            f"mean {gate['mean_psnr_db']:.2f} dB; final-latent cosine min {gate['min_latent_cosine']:.5f} "
            f"(>= {opts.min_cosine}); {gate['method']}")
    if not gate["passed"]:
        for name in todo:  # the runtime refuses a build with rejected components
            manifest["components"][name]["status"] = "rejected"
        record.update(quality_gate=gate, status="failed", seconds=round(time.perf_counter() - t0, 2))
        manifest["stages"]["quantize"] = record
        manifest_io.save(job.out, manifest)
        raise GateFailed(
            f"quality gate failed: image PSNR {gate['min_psnr_db']:.2f} dB (threshold {opts.min_psnr}), latent "
            f"cosine {gate['min_latent_cosine']:.5f} (threshold {opts.min_cosine}) against the unquantized "
            "graphs. Keep more layers in high precision (--quant-exclude), try --int4-method awq, or set "
            "--min-psnr / --min-cosine if this loss is acceptable; figures in the manifest")
    return gate


def _kept_share(manifest: dict, name: str) -> dict:
    comps = manifest["components"]
    dit = comps["transformer"].get("unquantized", comps["transformer"])["weight_bytes"]
    return {"precision": comps[name]["precision"], "weight_bytes": comps[name]["weight_bytes"],
            "vs_transformer_unquantized": round(comps[name]["weight_bytes"] / max(dit, 1), 4)}


def _up_to_date(out: Path, entry: dict, key: str) -> bool:
    q = entry.get("quantization") or {}
    try:
        build = BuildFolder(out)
        scales = build.file(q.get("scales", "-"))
        folder = build.file(entry["onnx"]).parent if "onnx" in entry else None  # None: graphless
    except UserError:  # a previous manifest's path outside the folder: not reused, made anew
        return False
    if folder is None:
        return (q.get("key") == key and entry.get("status") in ("complete", "rejected") and scales.is_file()
                and file_sha256(scales) == q.get("scales_sha256"))
    # a rejected graph is reused too: a rebuild with other gate thresholds only re-runs the gate
    return (q.get("key") == key and entry.get("status") in ("complete", "rejected") and folder.is_dir()
            and folder_sha256(folder) == entry["onnx_sha256"] and scales.is_file()
            and file_sha256(scales) == q.get("scales_sha256"))
