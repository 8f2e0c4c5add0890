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
from pathlib import Path

import torch

from .. import __version__
from .. import manifest as manifest_io
from ..buildfolder import BuildFolder
from ..errors import UserError
from ..facts import small_model
from ..hashing import file_sha256, folder_sha256
from ..lora.fuse import loader_kwargs, recorded_key
from ..scales import save_scales
from ..schemes import SCHEMES, get_scheme
from ..targets import QUANTIZED
from ..variants import get_variant
from .calibrate import CachedText, attention_modules, calibrate, plan_layers, sampling_loop, text_encoder_loop
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
    parts = [entry["unquantized"]["onnx_sha256"], scheme, json.dumps(made, sort_keys=True), str(block),
             str(calib_sha), __version__] + ([f"lora:{loras}"] if loras else [])  # fused LoRAs: calibration saw them
    return hashlib.sha256("|".join(parts).encode()).hexdigest()


def quantize_stage(job, manifest: dict) -> dict:
    """Run the stage; returns its manifest record. `job.prompts`: the calibration prompts (empty when no scheme of
    the plan needs data; the build has checked the plan with `check_supported`). Raises GateFailed (after recording
    why) below the thresholds. `job.drop_intermediate`: the unquantized graphs are deleted afterwards (they only
    serve the quality gate and rebuilds)."""
    if any(p in QUANTIZED for p in job.plan.values()):
        manifest["quantize_options"] = job.quant.as_dict()
    record = _quantize(job.out, manifest, job.v, job.plan, job.quant, job.prompts, job.ckpt, job.log)
    if record["status"] == "skipped":
        job.log(f"[quantize] skipped: {record['reason']}")
    elif job.drop_intermediate:
        for name, entry in manifest["components"].items():
            unq = entry.get("unquantized")
            if unq and unq["onnx"] != entry["onnx"] and not unq.get("dropped"):
                BuildFolder(job.out).drop_graph(unq, job.log, f"{name} (unquantized)")
    return record


def _quantize(out: Path, manifest: dict, variant, plan: dict, opts: QuantOptions, prompts: list[str],
              ckpt: Path, log) -> dict:
    from .qdq import quantize_graph

    t0 = time.perf_counter()
    todo = {c: plan[c] for c in variant.components if plan[c] in QUANTIZED}
    if not todo:
        return {"status": "skipped", "reason": f"precision {manifest['precision']} needs no quantization"}
    block = int4_block(opts, manifest["model"]["facts"])
    side = opts.calib_side or manifest["defaults"]["height"]
    images = None  # the omni layout's condition images (quantize/edit_inputs.py), part of the calibration data
    if prompts and variant.layout == "omni":
        from .edit_inputs import CalibrationImages

        images = CalibrationImages(side, opts.calib_images)
    calib_sha = prompts_sha256(prompts) if prompts else None
    if images is not None:
        calib_sha = hashlib.sha256(f"{calib_sha}|{images.sha256}".encode()).hexdigest()
    loras = recorded_key(manifest)

    for name in todo:  # the exported graph becomes the "unquantized" record (kept across rebuilds)
        entry = manifest["components"][name]
        if "unquantized" not in entry:
            entry["unquantized"] = {k: entry[k] for k in ("onnx", "onnx_sha256", "bytes", "weight_bytes", "precision")}
    stale = [n for n, s in todo.items() if not _up_to_date(out, manifest["components"][n],
                                                           _key(manifest["components"][n], s, opts, block, calib_sha,
                                                                loras))]
    for name in todo:
        if name not in stale:
            log(f"[quantize] {name}: up to date, skipped")

    calib_seconds = None
    scales: dict[str, dict] = {}
    if stale and any(needs_data(todo[n], opts) for n in stale):
        tc = time.perf_counter()
        scales = _calibrate(out, manifest, todo, opts, prompts, side, block, ckpt, log, images)
        gc.collect()  # the calibrated models (held in modelopt's reference cycles) before the graph rewrite
        calib_seconds = round(time.perf_counter() - tc, 2)
        log(f"[quantize] calibrated on {len(prompts)} prompts at {side}x{side} in {calib_seconds:.1f} s")
    fp8_source = None
    if scales.get("transformer") is not None and todo.get("transformer") == "fp8":  # an FP8 single file's own grid
        from .reuse import choose

        fp8_source = choose(scales["transformer"], ckpt, fused_loras=bool(loras))

    for name in stale:
        scheme, entry = todo[name], manifest["components"][name]
        folder = BuildFolder(out)
        src = folder.file(entry["unquantized"]["onnx"]).parent
        dst = folder.graph_dir(name, scheme)
        summary = quantize_graph(src, dst, scheme, block, scales.get(name), opts.exclude)
        used = summary.pop("scales")
        scale_file = folder.scales(name, scheme)
        method = get_scheme(scheme).describe(calibrated=name in scales)
        save_scales(scale_file, used, {"scheme": scheme, "block": summary["block"], "component": name,
                                       "method": method})
        entry.update(
            onnx=BuildFolder.graph_rel(name, scheme), onnx_sha256=folder_sha256(dst), precision=scheme,
            status="complete",  # a previous engine stays a candidate: its key holds this graph's hash
            bytes=sum(p.stat().st_size for p in dst.iterdir()), weight_bytes=summary["bytes_after"],
            quantization={
                "key": _key(entry, scheme, opts, block, calib_sha, loras), "scheme": scheme, "method": method,
                "block": summary["block"], "layers": len(summary["quantized"]),
                "activation_qdq": summary["activation_qdq"], "awq_scaled": summary["awq_scaled"],
                "attention_qdq": summary["attention_qdq"],
                **({"fp8_source": fp8_source} if fp8_source and name in ("transformer", "controlnet") else {}),
                "kept": summary["kept"], "exclude": list(opts.exclude),
                "weight_bytes": {"before": summary["bytes_before"], "after": summary["bytes_after"]},
                "scales": BuildFolder.scales_rel(name, scheme), "scales_sha256": file_sha256(scale_file),
                "calibration": ({"prompts": str(opts.calib_prompts or "shipped"), "count": len(prompts),
                                 "sha256": calib_sha, "size": [side, side],
                                 "steps": opts.calib_steps or manifest["defaults"]["steps"], "seconds": calib_seconds,
                                 **({"condition_images": images.record(opts.calib_images)} if images else {})}
                                if name in scales else None),
            })
        manifest_io.save(out, manifest)
        before, after = summary["bytes_before"], summary["bytes_after"]
        act = get_scheme(scheme).activation_kind
        log(f"[quantize] {name}: {scheme}, {len(summary['quantized'])} layers ({summary['activation_qdq']} with "
            f"{act} activations, {summary['awq_scaled']} AWQ-scaled, {summary['attention_qdq']} FP8 attentions), "
            f"{len(summary['kept'])} 2-D weights kept; weights "
            f"{before / 1e6:.1f} MB -> {after / 1e6:.1f} MB ({after / before:.2f}x)")

    record = {"status": "done", "components": todo, "seconds": None, "calibration_seconds": calib_seconds}
    if "vision_encoder" in variant.components:  # the SigLIP tower: kept in the base precision, its share measured
        record["vision_encoder"] = _kept_share(manifest, "vision_encoder")
        log(f"[quantize] vision_encoder (SigLIP) kept in {record['vision_encoder']['precision']}: "
            f"{record['vision_encoder']['weight_bytes'] / 1e6:.1f} MB of weights, "
            f"{record['vision_encoder']['vs_transformer_unquantized']:.1%} of the DiT's unquantized weights; "
            "it runs once per condition image per request, not per step")
    for name in todo:  # intact graphs (a rejected one reused by a rebuild too) until the gate says otherwise
        manifest["components"][name]["status"] = "complete"
    manifest_io.save(out, manifest)
    if opts.gate:
        from .gate import run_gate

        gate = run_gate(out, manifest, opts.gate_prompts, side, opts.min_psnr, opts.min_cosine)
        record["quality_gate"] = gate
        verdict = "passed" if gate["passed"] else "FAILED"
        log(f"[quantize] quality gate {verdict}: PSNR min {gate['min_psnr_db']:.2f} dB (>= {opts.min_psnr}), "
            f"mean {gate['mean_psnr_db']:.2f} dB; final-latent cosine min {gate['min_latent_cosine']:.5f} "
            f"(>= {opts.min_cosine}); {gate['method']}")
        if not gate["passed"]:
            for name in todo:  # the runtime refuses a build with rejected components
                manifest["components"][name]["status"] = "rejected"
            record.update(status="failed", seconds=round(time.perf_counter() - t0, 2))
            manifest["stages"]["quantize"] = record
            manifest_io.save(out, manifest)
            raise GateFailed(
                f"quality gate failed: image PSNR {gate['min_psnr_db']:.2f} dB (threshold {opts.min_psnr}), latent "
                f"cosine {gate['min_latent_cosine']:.5f} (threshold {opts.min_cosine}) against the unquantized "
                "graphs. Keep more layers in high precision (--quant-exclude), try --int4-method awq, or set "
                "--min-psnr / --min-cosine if this loss is acceptable; figures in the manifest")
    else:
        record["quality_gate"] = {"status": "skipped", "reason": "--no-quality-gate"}
    record["seconds"] = round(time.perf_counter() - t0, 2)
    return record


def _kept_share(manifest: dict, name: str) -> dict:
    comps = manifest["components"]
    dit = comps["transformer"].get("unquantized", comps["transformer"])["weight_bytes"]
    return {"precision": comps[name]["precision"], "weight_bytes": comps[name]["weight_bytes"],
            "vs_transformer_unquantized": round(comps[name]["weight_bytes"] / max(dit, 1), 4)}


def _up_to_date(out: Path, entry: dict, key: str) -> bool:
    q = entry.get("quantization") or {}
    try:
        build = BuildFolder(out)
        folder, scales = build.file(entry["onnx"]).parent, build.file(q.get("scales", "-"))
    except UserError:  # a previous manifest's path outside the folder: not reused, made anew
        return False
    # a rejected graph is reused too: a rebuild with other gate thresholds only re-runs the gate
    return (q.get("key") == key and entry.get("status") in ("complete", "rejected") and folder.is_dir()
            and folder_sha256(folder) == entry["onnx_sha256"] and scales.is_file()
            and file_sha256(scales) == q.get("scales_sha256"))


@torch.no_grad()
def _calibrate(out, manifest, todo, opts, prompts, side, block, ckpt, log, images=None) -> dict[str, dict]:
    """modelopt calibration of the text encoder (prompts) and the DiT (the sampling loop, behind the text encoder
    as deployed; the omni layout's with `images`, edit_inputs.CalibrationImages). Returns component -> scales for
    the components calibrated from data."""
    from ..export.specs import DTYPES
    from ..models.load import load_dit, load_text_encoder
    from ..runtime.backends import TorchBackend
    from ..runtime.open import PIPELINES
    from ..runtime.prompt import PromptTokenizer
    from ..models.emulate import apply_scales

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = DTYPES[manifest["components"]["transformer"]["compute_dtype"]]
    log(f"[quantize] calibrating on {device} ({str(dtype).replace('torch.', '')}), {len(prompts)} prompts")
    te = load_text_encoder(ckpt, dtype).to(device)
    tok = PromptTokenizer(BuildFolder(out).tokenizer, manifest["defaults"]["max_sequence_length"])
    scales = {}
    if "text_encoder" in todo:
        scheme = todo["text_encoder"]
        layers = plan_layers(te, scheme, opts.exclude, block)
        if needs_data(scheme, opts):
            scales["text_encoder"] = calibrate(te, scheme, layers, block, opts.int4_method,
                                               text_encoder_loop(_text_batches(tok, prompts, False, images, 8),
                                                                 device))
        else:  # round to nearest: the DiT is still calibrated behind the text encoder it will be deployed with
            apply_scales(te, _rtn_scales(te, layers, scheme, block), scheme, block)
    if "transformer" in todo and needs_data(todo["transformer"], opts):
        # the text encoder's outputs first (as deployed, quantized or not), then the DiT alone in memory
        cfg = manifest["defaults"]["guidance_scale"] > 0
        batches = _text_batches(tok, prompts, cfg, images)
        text = TorchBackend(out, manifest, device=device, torch_mode="eager", modules={"text_encoder": te})
        cache = CachedText.encode(text, batches)
        del text
        del te
        gc.collect()  # modelopt's wrappers form reference cycles: free the text encoder before the DiT loads
        scheme = todo["transformer"]
        from ..controlnet import loader_kwargs as controlnet_kwargs, sample_request

        dit = load_dit(ckpt, dtype, **loader_kwargs(out, manifest, "transformer"),  # LoRAs fused
                       **controlnet_kwargs(manifest, "transformer")).to(device)  # and the ControlNet's branch
        # only the per-step graphs' layers: the context refiner (once per prompt) is its own, unquantized graph; the
        # ControlNet's branch (its own graph, sharing the noise refiner) is calibrated in the same loop, with control
        # images, when it is quantized too
        skip = ("context_refiner", "siglip_refiner") + (() if "controlnet" in todo else ("control.",))
        layers = plan_layers(dit, scheme, opts.exclude, block, skip_prefixes=skip)
        attention = attention_modules(dit, opts.exclude, skip) \
            if get_scheme(scheme).calibrates_activations and opts.fp8_attention else []
        modules = {"transformer": dit}
        if manifest.get("controlnet") or images is not None:  # control / condition images are VAE-encoded
            from ..models.load import load_vae_encoder, load_vision_encoder

            modules["vae_encoder"] = load_vae_encoder(ckpt, dtype).to(device)
            if images is not None:  # and condition images go through the SigLIP tower (as deployed: unquantized)
                modules["vision_encoder"] = load_vision_encoder(ckpt, dtype).to(device)
        backend = CachedText(TorchBackend(out, manifest, device=device, torch_mode="eager", modules=modules),
                             cache)
        facts = manifest["model"]["facts"]
        pipe = PIPELINES[get_variant(manifest["variant"]).layout](out, backend)
        loop = sampling_loop(pipe, prompts, side, opts.calib_steps,
                             images.request if images is not None else lambda i: sample_request(facts, i, side))
        scales["transformer"] = calibrate(dit, scheme, layers, block, opts.int4_method, loop, attention)
        if "controlnet" in todo:  # one module, one set of scales: the shared noise refiner quantized alike
            scales["controlnet"] = scales["transformer"]
    return scales


def _text_batches(tok, prompts: list[str], cfg: bool, images=None, per: int = 1) -> list[tuple]:
    """The text encoder's inputs the sampling loop asks for, batch by batch: `per` prompts (and CFG's empty
    negative) in the chat template; the omni layout's: each prompt's caption segments around its condition
    images, tokenized together as the Edit pipeline does (runtime/edit.py segment_features)."""
    if images is None:
        texts = prompts + ([""] if cfg else [])
        return [tok(texts[i:i + per]) for i in range(0, len(texts), per)]
    from ..runtime.omni import prompt_segments

    batches = []
    for i, p in enumerate(prompts):
        n = len(images.request(i)["images"])
        batches += [tok.tokenize(prompt_segments(t, n)) for t in [p] + ([""] if cfg else [])]
    return batches


def _rtn_scales(model, layers, scheme, block) -> dict[str, torch.Tensor]:
    modules, kind = dict(model.named_modules()), get_scheme(scheme)
    return {f"{n}.weight_amax": kind.weight_amax(modules[n].weight, block).cpu() for n in layers}

