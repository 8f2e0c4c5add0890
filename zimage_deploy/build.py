"""`python -m zimage_deploy.build`: checkpoint -> ONNX graphs (-> quantized graphs -> engines) + manifest.

The command line and the stage sequence. Each stage is a module with one entry that takes the build's checked
inputs (job.py BuildJob: the build folder is `job.out`) and the manifest, and returns its manifest record:
export/stage.py, export/parity.py, quantize/stage.py, engines/stage.py. Stages talk through files and
DIR/manifest.json. A stage whose output is already built for the same inputs (content hashes) is skipped; every
artifact is written under a temp name and renamed when complete; a component is marked complete in the manifest
only once its files are in place.
"""

from __future__ import annotations

import argparse
import datetime as dt
import platform
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch
from tqdm import tqdm

from . import __version__
from . import manifest as manifest_io
from .buildfolder import BuildFolder, support_folders
from .checkpoint import content_hash, part_hashes, resolve
from .cli import run_cli
from .controlnet import BuildControlNet
from .engines.builder import EngineBuilder
from .engines.flavour import import_trt
from .engines.profiles import EngineOptions, profiles
from .engines.stage import engines_stage
from .errors import UserError
from .export.parity import parity_stage
from .export.stage import export_stage, kept_components
from .facts import default_side, model_facts
from .fsutil import folder_lock
from .job import BuildJob
from .manifest import ALL_RESIDENT, Defaults, TensorRT, runtime_plan
from .lora.fuse import BuildLoras
from .quantize.options import DEFAULT_EXCLUDE, INT4_METHODS, QuantOptions
from .quantize.stage import quantize_stage
from .runtime.backends import TORCH_COMPILED
from .singlefile import sources
from .schemes import get_scheme
from .targets import PRECISIONS, QUANTIZED, TARGETS, TEXT_ENCODER_PRECISIONS, get_target, precision_plan
from .variants import VARIANTS, get_variant


def default_out(model: str, variant: str, target: str, precision: str) -> Path:
    from .checkpoint import model_key

    key = model_key(model, variant)
    return Path("export") / f"{key}-{precision}" if target == "cpu" else Path("engines") / f"{key}-{target}-{precision}"


def build(model: str, variant: str | None = None, target: str = "cpu", precision: str | None = None,
          out: Path | None = None, parity: bool = True, engine_opts: EngineOptions | None = None, log=tqdm.write,
          lean: str = "auto", quant: QuantOptions | None = None, text_encoder_precision: str | None = None,
          engines: bool = True, loras=(), drop_intermediate: bool = False, controlnet=None, base: str | None = None,
          transformer: str | None = None, text_encoder: str | None = None, vae: str | None = None,
          graphs: str = "auto") -> Path:
    """`variant`: None reads it from the checkpoint (model_index.json); `quant`: how quantized precisions are made
    (calibration, exclusions, quality gate); `text_encoder_precision` overrides the text encoder's ("bf16" = not
    quantized); `engines=False` stops after the graphs (engines are then built by running the same build again
    where the target's TensorRT is); `loras`: LoRAs fused into the DiT ((path, scale) pairs or 'PATH[:SCALE]');
    `controlnet`: a ControlNet exported beside the DiT (controlnet.py; a ZImageControlNetPipeline's own without it).
    Single files (singlefile.py): `model` a transformer file with `base` (a diffusers folder) or `text_encoder` and
    `vae` files; `transformer` a DiT file replacing the one of the diffusers folder `model`. `graphs`: "auto" makes
    no ONNX graphs for a build the compiled Torch runtime runs (`_graphless`), "on" always makes them.

    Everything that can be checked is checked before anything is written; then the output folder is locked
    (a second build into it is refused) while the stages write it."""
    from .quantize.options import load_prompts
    from .quantize.stage import check_supported, needs_data

    t = get_target(target)
    text_encoder_precision = t.text_encoder_for(precision, text_encoder_precision)
    if precision is None and text_encoder_precision is not None:
        log(f"[target] {t.name}: {t.default_precision} with a {text_encoder_precision} text encoder (its default)")
    precision = precision or t.default_precision
    t.check_precision(precision)
    if engine_opts is not None and engine_opts.lora_bounds and t.flavour == "none":
        raise UserError("--max-lora-rank / --max-loras size the TensorRT engines' LoRA branch: target cpu builds no "
                        "engines (ONNX Runtime and Torch take run-time LoRAs without it)")
    if quant is not None and quant.fp8_attention and t.compute_capability == (9, 0):
        raise UserError("--fp8-attention is refused on SM90 targets (h800/h100/h200): FP8 attention has not been "
                        "measured on Hopper here, and NVIDIA's diffusion demo keeps FP8 attention off on Hopper; "
                        "build without it (FP8 GEMMs stay)")
    if variant is not None:
        get_variant(variant)  # an unknown name fails before the checkpoint is touched
    if text_encoder_precision not in (None, *TEXT_ENCODER_PRECISIONS):
        raise UserError(f"text encoder precision must be one of {TEXT_ENCODER_PRECISIONS}")
    if text_encoder_precision in QUANTIZED and text_encoder_precision not in t.precisions:
        raise UserError(f"target {target!r} does not run {text_encoder_precision}")
    ckpt, variant = _checkpoint(model, variant, base, transformer, text_encoder, vae, log)
    fused = BuildLoras(loras, ckpt)  # read and checked against the checkpoint's transformer
    control = BuildControlNet(controlnet, ckpt, variant)  # checked against it too
    v = control.variant(get_variant(variant))
    plan = control.plan(precision_plan(precision, t.base, text_encoder_precision))
    quant = quant or QuantOptions()
    check_supported(plan, v, quant)
    prompts = load_prompts(quant.calib_prompts, quant.calib_size, v.layout) \
        if any(needs_data(p, quant) for p in plan.values()) else []
    facts = control.facts(model_facts(ckpt))
    engine_opts = engine_opts or EngineOptions()
    # a datacenter target (l40s, h800, h100, h200, b200) without TensorRT: a build for the compiled Torch runtime
    torch_runtime = engines and t.flavour == "tensorrt" and not _importable(t.flavour)
    if t.flavour != "none" and engines and not torch_runtime and v.layout == "basic":  # weight streaming is built
        from .plan import planned_engine_options  # into the engines

        engine_opts = planned_engine_options(t.name, precision, default_side(facts), v.name, str(ckpt),
                                             text_encoder_precision, controlnet, engine_opts, log)
    # fails when the target's TensorRT is missing (TensorRT-RTX targets: it builds here, ahead of time)
    engine_builder = EngineBuilder(t, engine_opts) if t.flavour != "none" and engines and not torch_runtime else None
    if graphs not in ("auto", "on"):
        raise UserError(f"graphs must be 'auto' or 'on', got {graphs!r}")
    engine_shapes = profiles(v, facts, engine_opts) if engine_builder else None
    out = Path(out) if out else default_out(transformer or model, variant, target, precision)
    with folder_lock(out):
        return _build(BuildJob(ckpt, model, v, t, precision, plan, out, parity, engine_opts, engine_builder,
                               engine_shapes, facts, log, lean, quant, prompts, fused, drop_intermediate, control,
                               torch_runtime=torch_runtime,
                               graphs=not (graphs == "auto" and _graphless(torch_runtime, v, plan))))


def _graphless(torch_runtime: bool, v, plan: dict) -> bool:
    """A build for the compiled Torch runtime needs no ONNX graphs when the runtime loads every component from the
    checkpoint and runs each quantized one from its calibrated scales alone: the basic layout, every quantized
    scheme one the compiled runtime runs as real FP8 matmuls (its scales are the calibration's; the INT4 / NVFP4
    weight grids are written by the graph rewrite, so those builds keep their graphs)."""
    quantized = {p for p in plan.values() if p in QUANTIZED}
    return torch_runtime and v.layout == "basic" and all(get_scheme(p).fp8_matmuls for p in quantized)


def _checkpoint(model, variant, base, transformer, text_encoder, vae, log) -> tuple[Path, str]:
    """The checked checkpoint folder and variant: a diffusers folder / hub id / tiny as given, or the diffusers-layout
    view of single files (singlefile.py)."""
    from .singlefile import prepare

    if transformer or base or text_encoder or vae or Path(model).expanduser().is_file():
        view, variant = prepare(model, variant, base, transformer, text_encoder, vae, log)
        return resolve(str(view), variant)
    return resolve(model, variant)


def _build(job: BuildJob) -> Path:
    """The stage sequence: checkpoint -> export -> parity -> quantize -> engines (-> the VRAM plan's mode)."""
    started = time.perf_counter()
    out, log = job.out, job.log
    job.previous = _previous_manifest(out)
    manifest = _start(job)
    for name, stage in (("export", export_stage), ("parity", parity_stage), ("quantize", quantize_stage),
                        ("engines", engines_stage)):
        if name == "engines" and job.torch_runtime:
            stage = _torch_runtime_stage
        manifest["stages"][name] = stage(job, manifest)
        manifest_io.save(out, manifest)
    if job.t.compute_capability is not None and job.v.layout == "basic":
        _runtime_mode(job, manifest)
    if job.torch_runtime:  # generate --backend auto picks torch: the VRAM plan's record (if any) with the backend
        manifest["runtime"] = replace(runtime_plan(manifest), backend=TORCH_COMPILED).to_dict()
    manifest["stages"]["total_seconds"] = round(time.perf_counter() - started, 2)
    manifest_io.save(out, manifest)
    log(f"[done] {out / manifest_io.NAME}")
    return out


def _start(job: BuildJob) -> dict:
    """The checkpoint stage: hash it, write the manifest with what the previous build left up to date, copy the
    tokenizer, scheduler (and SigLIP processor), the fused LoRAs and the ControlNet's record."""
    v, t, ckpt, out, facts = job.v, job.t, job.ckpt, job.out, job.facts
    job.log(f"[checkpoint] {ckpt} ({v.name})")
    sha = content_hash(ckpt)
    model = {"source": job.model, "path": str(ckpt), "sha256": sha, "parts": part_hashes(ckpt), "facts": facts,
             **({"sources": srcs} if (srcs := sources(ckpt)) else {})}
    side = default_side(facts)
    manifest = {
        "schema": manifest_io.SCHEMA,
        "zimage_deploy": __version__,
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "host": {"machine": platform.machine(), "python": platform.python_version(), "torch": torch.__version__},
        "variant": v.name,
        "target": t.name,
        "precision": job.precision,
        "model": model,
        "plan": {c: job.plan[c] for c in v.components},
        "defaults": Defaults(
            steps=v.default_steps, guidance_scale=v.default_guidance, height=side, width=side,
            resolution_multiple=facts["vae_scale_factor"] * facts["patch_size"], max_sequence_length=512,
        ).to_dict(),
        "tensorrt": TensorRT(
            flavour=t.flavour, version=job.engine_builder.version if job.engine_builder else None,
            compute_capability=tuple(t.compute_capability or ()) or None, options=job.engine_opts.as_dict(),
        ).to_dict(),
        "components": kept_components(job, model),
        "stages": {},
    }
    out.mkdir(parents=True, exist_ok=True)
    if job.controlnet:
        manifest["controlnet"] = job.controlnet.record()  # path, sha256, config: what the Torch backend reloads
    if job.loras:
        manifest["loras"] = job.loras.save(out)  # DIR/loras/ copies: what reloads the DiT later fuses the same
    for folder in support_folders(v.layout == "omni"):
        BuildFolder(out).copy_support(ckpt, folder)
    manifest_io.save(out, manifest)
    return manifest


def _importable(flavour: str) -> bool:
    try:
        import_trt(flavour)
        return True
    except UserError:
        return False


def _torch_runtime_stage(job: BuildJob, manifest: dict) -> dict:
    reason = (f"{job.t.flavour} is not installed here: this {job.t.name} build runs on the compiled Torch runtime "
              "(generate --backend auto or torch; the FP8 scales are the quantize stage's)")
    job.log(f"[engines] skipped: {reason}")
    return {"status": "skipped", "reason": reason, "runtime": TORCH_COMPILED}


def _runtime_mode(job: BuildJob, manifest: dict) -> None:
    """The VRAM plan picks the runtime mode for the target at the default size (plan.py models the basic layout)."""
    from .plan import make_plan, runtime_record

    vram = make_plan(job.t.name, job.precision, manifest["defaults"]["height"], manifest["defaults"]["width"],
                     job.v.name, engine_dir=job.out, lora=job.engine_opts.lora_bounds)
    record = runtime_record(vram)
    manifest["runtime"] = record.to_dict()
    manifest_io.save(job.out, manifest)
    job.log(f"[plan] runtime mode {vram.mode} on {job.t.name} at {vram.height}x{vram.width}: it needs "
            f"{record.needs_gib.get(vram.mode, '-')} GiB of {record.memory_gib} "
            f"(all resident: {record.needs_gib[ALL_RESIDENT]}; python -m zimage_deploy.plan "
            f"--engine-dir {job.out} for the table)")
    for line in vram.advice:
        job.log(f"[plan] does better: {line}")


def _previous_manifest(out: Path) -> manifest_io.Manifest | dict:
    try:
        return manifest_io.load(out)
    except UserError:
        return {}


def _size(text: str) -> tuple[int, int]:
    try:
        h, w = (int(x) for x in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected HxW, e.g. 1024x1024, got {text!r}") from None
    return h, w


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    build(args.model, args.variant, args.target, args.precision, args.out, parity=not args.skip_parity,
          engine_opts=_engine_options(args), lean=args.lean, quant=_quant_options(args),
          text_encoder_precision=args.text_encoder_precision, engines=not args.skip_engines, loras=args.lora,
          drop_intermediate=args.drop_intermediate, controlnet=args.controlnet, base=args.base,
          transformer=args.transformer, text_encoder=args.text_encoder, vae=args.vae, graphs=args.graphs)
    return 0


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m zimage_deploy.build", description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="tiny",
                    help="'tiny' / 'tiny-base' / 'tiny-edit' (embedded test checkpoints, written to "
                         "$ZIMAGE_DEPLOY_CACHE or ~/.cache/zimage_deploy on first use), a diffusers-layout "
                         "directory, or a hub id (default: %(default)s)")
    ckpt = ap.add_argument_group("single-file checkpoints (--model FILE.safetensors: a Z-Image transformer in the "
                                 "original / ComfyUI / diffusers key layout, plain or FP8)")
    ckpt.add_argument("--base", default=None, metavar="DIR",
                      help="a Z-Image diffusers folder (or hub id / tiny name) the text encoder, VAE, tokenizer, "
                           "scheduler (and SigLIP parts) come from; it also says Turbo or Base")
    ckpt.add_argument("--text-encoder", default=None, metavar="FILE",
                      help="a Qwen3 text encoder file (transformers / ComfyUI layout, e.g. qwen_3_4b.safetensors)")
    ckpt.add_argument("--vae", default=None, metavar="FILE",
                      help="the Flux autoencoder file (ae.safetensors, original or diffusers layout)")
    ckpt.add_argument("--transformer", default=None, metavar="FILE",
                      help="a transformer file replacing the DiT of the diffusers folder --model (a fine-tune)")
    ap.add_argument("--variant", default=None, choices=sorted(VARIANTS),
                    help="default: read from the checkpoint's model_index.json (ZImageOmniPipeline: edit; "
                         "ZImagePipeline: turbo, or base for tiny-base / Tongyi-MAI/Z-Image); a variant the "
                         "checkpoint contradicts is an error")
    ap.add_argument("--target", default="cpu", choices=list(TARGETS),
                    help="where the build runs: cpu (ONNX graphs for ONNX Runtime / Torch) or a GPU, for which "
                         "engines are built (default: %(default)s)")
    ap.add_argument("--precision", default=None, choices=PRECISIONS,
                    help="default: the target's default (cpu: fp32, GPUs: bf16)")
    ap.add_argument("--out", type=Path, default=None,
                    help="output folder (default: export/<model>-<precision> for cpu, "
                         "engines/<model>-<target>-<precision> for GPU targets)")
    ap.add_argument("--skip-parity", action="store_true",
                    help="do not check the exported graphs against the Torch modules (by default a component over "
                         "its tolerance fails the build)")
    ap.add_argument("--lean", default="auto", choices=("auto", "on", "off"),
                    help="memory-lean export: trace two-layer templates, stream weights from the checkpoint "
                         "(auto: when the DiT and text encoder exceed 4 GiB)")
    ap.add_argument("--controlnet", default=None, metavar="PATH",
                    help="a Z-Image ControlNet exported beside the DiT: a diffusers ZImageControlNetModel folder or a "
                         "single .safetensors (Z-Image-Turbo-Fun-Controlnet-Union format); a ZImageControlNetPipeline "
                         "checkpoint's own controlnet/ is used without it")
    ap.add_argument("--lora", action="append", default=[], metavar="PATH[:SCALE]",
                    help="fuse a LoRA into the DiT before export and quantization (repeatable; a .safetensors file "
                         "or a folder holding one; diffusers/PEFT, kohya or original Z-Image keys; scale default 1)")
    ap.add_argument("--graphs", default="auto", choices=("auto", "on"),
                    help="ONNX graphs: 'auto' (default) makes none for a build the compiled Torch runtime runs (a "
                         "datacenter target without TensorRT, bf16 or fp8: the runtime loads the checkpoint), 'on' "
                         "always (for ONNX Runtime, or engines built later where TensorRT is)")
    ap.add_argument("--drop-intermediate", action="store_true",
                    help="delete what the runtime does not need as soon as it is used: unquantized graphs after "
                         "quantization, and (GPU targets) each graph once its engine plan holds its weights; halves "
                         "the build folder of real-size builds, but a rebuild exports again and only the TensorRT "
                         "backend can run the build (default: keep everything)")
    _quant_arguments(ap.add_argument_group("quantization (--precision fp8 / int4; nvfp4 for Blackwell: rtx5090, "
                                           "b200)"))
    _engine_arguments(ap.add_argument_group("engines (GPU targets)"))
    return ap


def _quant_arguments(q) -> None:
    q.add_argument("--text-encoder-precision", default=None, choices=TEXT_ENCODER_PRECISIONS,
                   help="text encoder precision (default: int4 with --precision int4, else not quantized; "
                        "bf16 = not quantized, float32 on the cpu target)")
    q.add_argument("--calib-prompts", type=Path, default=None,
                   help="calibration prompts, one per line (default: the 72 EN/ZH prompts shipped; Edit builds: "
                        "the 24 EN/ZH instructions shipped)")
    q.add_argument("--calib-images", type=Path, default=None, metavar="DIR",
                   help="Edit builds: condition images (PNG/JPEG/WebP) calibrated with, besides the embedded "
                        "synthetic set (default: that set only)")
    q.add_argument("--calib-size", type=int, default=None, help="number of calibration prompts (default: all)")
    q.add_argument("--calib-side", type=int, default=None,
                   help="image side calibrated at (default: the build's default size)")
    q.add_argument("--calib-steps", type=int, default=None,
                   help="sampling steps per calibration prompt (default: the variant's, e.g. 8 for Turbo)")
    q.add_argument("--int4-method", default="awq", choices=INT4_METHODS,
                   help="awq: activation-aware scales (modelopt awq_lite); rtn: round to nearest, no calibration")
    q.add_argument("--int4-block", type=int, default=None,
                   help="INT4 block size (default 128; 32 for small test checkpoints)")
    q.add_argument("--quant-exclude", default=",".join(DEFAULT_EXCLUDE), metavar="NAMES",
                   help="comma-separated module-name substrings kept in high precision (default: %(default)s)")
    q.add_argument("--fp8-attention", action="store_true",
                   help="fp8 / nvfp4: quantize the DiT's attention BMMs to FP8 too (q, k, v and the softmax output)")
    q.add_argument("--no-quality-gate", action="store_true", help="do not compare with the unquantized graphs")
    q.add_argument("--gate-prompts", type=int, default=3, help="prompts the quality gate runs (default 3)")
    q.add_argument("--min-psnr", type=float, default=QuantOptions.min_psnr,
                   help="quality gate: least image PSNR in dB vs unquantized (default %(default)s)")
    q.add_argument("--min-cosine", type=float, default=QuantOptions.min_cosine,
                   help="quality gate: least final-latent cosine vs unquantized (default %(default)s)")


def _engine_arguments(eng) -> None:
    eng.add_argument("--skip-engines", action="store_true",
                     help="stop after the (quantized) graphs; a later build into the same --out adds the engines")
    eng.add_argument("--opt-level", type=int, default=3, choices=range(6), help="builder optimisation level (default 3)")
    eng.add_argument("--max-batch", type=int, default=4, help="largest batch the engines accept (default 4)")
    eng.add_argument("--min-side", type=int, default=None, help="smallest image side in pixels (default: 512, 64 for small test checkpoints)")
    eng.add_argument("--max-side", type=int, default=None, help="largest image side in pixels (default: 2048, 512 for small test checkpoints)")
    eng.add_argument("--opt-side", type=int, default=None, help="image side the engines are tuned for (default: 1024, 256 for small test checkpoints)")
    eng.add_argument("--static", type=_size, default=None, metavar="HxW",
                     help="static shapes (one size and batch; what CUDA graphs want; default: dynamic profiles)")
    eng.add_argument("--static-batch", type=int, default=1, help="batch of the --static profile (default 1)")
    eng.add_argument("--refittable", action="store_true", help="build refittable engines (default: off)")
    eng.add_argument("--strip-weights", default="auto", choices=("auto", "on", "off"),
                     help="weightless engines (TensorRT STRIP_PLAN), refitted from the build's ONNX graphs when they "
                          "load: about half the builder's host memory and the build folder's disk for large graphs "
                          "(auto: graphs above 512 MiB of weights, i.e. the real-size DiT and text encoder, on "
                          "TensorRT-RTX builds when a GPU is present: it cannot build refittable plans ahead of time "
                          "without one; datacenter builds keep the weights; default: %(default)s)")
    eng.add_argument("--weight-streaming", action="store_true", help="allow weight streaming (small-memory cards; default: off)")
    eng.add_argument("--max-lora-rank", type=int, default=None, metavar="R",
                     help="run-time LoRA capacity: the DiT engines carry a LoRA side branch whose factors are engine "
                          "inputs, so LoRA sets switch per request on any precision (FP8 / INT4 / NVFP4 too) without "
                          "a refit or rebuild; R: rank per LoRA and row block (default 64 with --max-loras)")
    eng.add_argument("--max-loras", type=int, default=None, metavar="N",
                     help="LoRAs per set the engines' branch holds (default 4 with --max-lora-rank)")


def _engine_options(args) -> EngineOptions:
    return EngineOptions(opt_level=args.opt_level, max_batch=args.max_batch, min_side=args.min_side,
                         max_side=args.max_side, opt_side=args.opt_side, static=args.static,
                         static_batch=args.static_batch, refittable=args.refittable,
                         weight_streaming=args.weight_streaming, strip_weights=args.strip_weights,
                         lora_bounds=_lora_bounds(args))


def _lora_bounds(args) -> tuple[int, int] | None:
    if args.max_lora_rank is None and args.max_loras is None:
        return None
    from .lora.adapters import MAX_LORAS, MAX_RANK

    bounds = (MAX_RANK if args.max_lora_rank is None else args.max_lora_rank,
              MAX_LORAS if args.max_loras is None else args.max_loras)
    if min(bounds) < 1:
        raise UserError("--max-lora-rank and --max-loras must be >= 1")
    return bounds


def _quant_options(args) -> QuantOptions:
    return QuantOptions(calib_prompts=args.calib_prompts, calib_size=args.calib_size, calib_side=args.calib_side,
                        calib_steps=args.calib_steps, calib_images=args.calib_images,
                        int4_method=args.int4_method, int4_block=args.int4_block, fp8_attention=args.fp8_attention,
                        exclude=tuple(e.strip() for e in args.quant_exclude.split(",") if e.strip()),
                        gate=not args.no_quality_gate, gate_prompts=args.gate_prompts, min_psnr=args.min_psnr,
                        min_cosine=args.min_cosine)


if __name__ == "__main__":
    sys.exit(run_cli(main))
