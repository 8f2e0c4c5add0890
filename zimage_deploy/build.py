"""`python -m zimage_deploy.build`: checkpoint -> ONNX graphs (-> quantized graphs -> engines) + manifest.

Stages run in order and talk through files and DIR/manifest.json. A stage whose output is already built for
the same inputs (content hashes) is skipped; every artifact is written under a temp name and renamed when
complete; a component is marked complete in the manifest only once its files are in place.
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import math
import platform
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from . import __version__
from . import manifest as manifest_io
from .checkpoint import content_hash, read_config, resolve
from .controlnet import BuildControlNet
from .cli import run_cli
from .errors import UserError
from .fsutil import atomic_dir, folder_lock
from .lora.fuse import BuildLoras
from .export.onnx_export import EXPORT_FORMAT, OPSET, export_component, file_hash
from .engines.builder import EngineBuilder, sha256_file
from .models.load import LOADER_OF, TEMPLATES, stream_weights
from .engines.profiles import EngineOptions, profiles
from .export.specs import CHECK_DIMS, DTYPES, specs_for
from .quantize.options import DEFAULT_EXCLUDE, INT4_METHODS, QuantOptions
from .targets import (PRECISIONS, QUANTIZED, TARGETS, TEXT_ENCODER_PRECISIONS, base_precision, get_target,
                      precision_plan)
from .variants import VARIANTS, get_variant

COMPUTE = {"fp32": torch.float32, "bf16": torch.bfloat16}


def model_facts(ckpt: Path) -> dict:
    dit, te, vae = (read_config(ckpt, f) for f in ("transformer", "text_encoder", "vae"))
    if dit["cap_feat_dim"] != te["hidden_size"]:
        raise UserError(f"transformer cap_feat_dim {dit['cap_feat_dim']} != text encoder hidden {te['hidden_size']}")
    patch = (dit.get("all_patch_size") or [2])[0]
    edit = {}
    if dit.get("siglip_feat_dim"):
        sig = read_config(ckpt, "siglip")
        sig = sig.get("vision_config", sig)
        edit = {"siglip_feat_dim": dit["siglip_feat_dim"], "vision_patch": sig["patch_size"],
                "vision_patch_dim": sig.get("num_channels", 3) * sig["patch_size"] ** 2,
                "vision_max_patches": read_config(ckpt, "siglip_processor",
                                                  "preprocessor_config.json").get("max_num_patches", 256)}
        if sig["hidden_size"] != dit["siglip_feat_dim"]:
            raise UserError(f"siglip hidden {sig['hidden_size']} != transformer siglip_feat_dim")
    return {**edit,
        "vocab_size": te["vocab_size"], "text_hidden": te["hidden_size"], "cap_feat_dim": dit["cap_feat_dim"],
        "dim": dit["dim"], "n_layers": dit["n_layers"], "latent_channels": vae["latent_channels"],
        "in_channels": dit["in_channels"], "vae_scale_factor": 2 ** (len(vae["block_out_channels"]) - 1),
        "patch_size": patch, "patch_dim": patch * patch * vae["latent_channels"],
        "vae_scaling": vae["scaling_factor"], "vae_shift": vae.get("shift_factor") or 0.0,
    }


def default_out(model: str, variant: str, target: str, precision: str) -> Path:
    from .checkpoint import model_key

    key = model_key(model, variant)
    return Path("export") / f"{key}-{precision}" if target == "cpu" else Path("engines") / f"{key}-{target}-{precision}"


def _component_key(model_sha: str, name: str, precision: str, loras: str = "") -> str:
    fused = f"|lora:{loras}" if loras else ""  # LoRAs fused into the DiT's weights (build --lora)
    payload = f"{model_sha}|{name}|{precision}|{OPSET}|{EXPORT_FORMAT}|{__version__}{fused}"
    return hashlib.sha256(payload.encode()).hexdigest()


def _copy_tree(src: Path, dst: Path) -> None:
    with atomic_dir(dst) as tmp:
        shutil.copytree(src, tmp, dirs_exist_ok=True)


class ParityFailed(UserError):
    """Exported graphs differ from the Torch modules by more than their declared tolerance."""


def build(model: str, variant: str | None = None, target: str = "cpu", precision: str | None = None,
          out: Path | None = None, parity: bool = True, engine_opts: EngineOptions | None = None, log=tqdm.write,
          lean: str = "auto", quant: QuantOptions | None = None, text_encoder_precision: str | None = None,
          engines: bool = True, loras=(), drop_intermediate: bool = False, controlnet=None) -> Path:
    """`variant`: None reads it from the checkpoint (model_index.json); `quant`: how quantized precisions are made
    (calibration, exclusions, quality gate); `text_encoder_precision` overrides the text encoder's ("bf16" = not
    quantized); `engines=False` stops after the graphs (engines are then built by running the same build again
    where the target's TensorRT is); `loras`: LoRAs fused into the DiT ((path, scale) pairs or 'PATH[:SCALE]');
    `controlnet`: a ControlNet exported beside the DiT (controlnet.py; a ZImageControlNetPipeline's own without it).

    Everything that can be checked is checked before anything is written; then the output folder is locked
    (a second build into it is refused) while the stages write it."""
    from .quantize.options import load_prompts
    from .quantize.stage import check_supported, needs_data

    t = get_target(target)
    precision = precision or t.default_precision
    t.check_precision(precision)
    if variant is not None:
        get_variant(variant)  # an unknown name fails before the checkpoint is touched
    if text_encoder_precision not in (None, *TEXT_ENCODER_PRECISIONS):
        raise UserError(f"text encoder precision must be one of {TEXT_ENCODER_PRECISIONS}")
    if text_encoder_precision in QUANTIZED and text_encoder_precision not in t.precisions:
        raise UserError(f"target {target!r} does not run {text_encoder_precision}")
    ckpt, variant = resolve(model, variant)
    fused = BuildLoras(loras, ckpt)  # read and checked against the checkpoint's transformer
    control = BuildControlNet(controlnet, ckpt, variant)  # checked against it too
    v = control.variant(get_variant(variant))
    plan = control.plan(precision_plan(precision, t.base, text_encoder_precision))
    check_supported(plan, variant, v.components)
    quant = quant or QuantOptions()
    prompts = load_prompts(quant.calib_prompts, quant.calib_size) if any(needs_data(p, quant) for p in plan.values()) \
        else []
    engine_opts = engine_opts or EngineOptions()
    # fails when the target's TensorRT is missing
    engine_builder = EngineBuilder(t, engine_opts) if t.flavour != "none" and engines else None
    facts = control.facts(model_facts(ckpt))
    engine_shapes = profiles(v, facts, engine_opts) if engine_builder else None
    out = Path(out) if out else default_out(model, variant, target, precision)
    with folder_lock(out):
        return _build(_Job(ckpt, model, v, t, precision, plan, out, parity, engine_opts, engine_builder,
                           engine_shapes, facts, log, lean, quant, prompts, fused, drop_intermediate, control))


@dataclass
class _Job:
    """One build's checked inputs."""
    ckpt: Path
    model: str
    v: object
    t: object
    precision: str
    plan: dict
    out: Path
    parity: bool
    engine_opts: EngineOptions
    engine_builder: EngineBuilder | None
    engine_shapes: dict | None
    facts: dict
    log: object
    lean: str
    quant: QuantOptions
    prompts: list
    loras: BuildLoras
    drop_intermediate: bool = False
    controlnet: BuildControlNet | None = None


def _build(job: _Job) -> Path:
    from .quantize.stage import quantize_stage

    ckpt, model, v, t, precision, plan, out = job.ckpt, job.model, job.v, job.t, job.precision, job.plan, job.out
    variant, target, facts, log, quant, prompts = v.name, t.name, job.facts, job.log, job.quant, job.prompts
    parity, lean, engine_opts, engine_builder = job.parity, job.lean, job.engine_opts, job.engine_builder
    engine_shapes = job.engine_shapes
    started = time.perf_counter()

    # -- stage 1: checkpoint --------------------------------------------------------------------------
    log(f"[checkpoint] {ckpt} ({variant})")
    sha = content_hash(ckpt)
    previous = _previous_manifest(out)
    small = facts["dim"] < 1024  # the embedded tiny model and other test checkpoints
    side = 256 if small else 1024
    manifest = {
        "schema": manifest_io.SCHEMA,
        "zimage_deploy": __version__,
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "host": {"machine": platform.machine(), "python": platform.python_version(), "torch": torch.__version__},
        "variant": variant,
        "target": target,
        "precision": precision,
        "model": {"source": model, "path": str(ckpt), "sha256": sha, "facts": facts},
        "plan": {c: plan[c] for c in v.components},
        "defaults": {
            "steps": v.default_steps, "guidance_scale": v.default_guidance, "height": side, "width": side,
            "resolution_multiple": facts["vae_scale_factor"] * facts["patch_size"], "max_sequence_length": 512,
        },
        "tensorrt": {
            "flavour": t.flavour, "version": engine_builder.version if engine_builder else None,
            "compute_capability": list(t.compute_capability or []) or None, "options": engine_opts.as_dict(),
        },
        "components": _up_to_date(previous, out, sha, plan, v.components, t.base, job.loras, job.controlnet),
        "stages": {},
    }
    out.mkdir(parents=True, exist_ok=True)
    if job.controlnet:
        manifest["controlnet"] = job.controlnet.record()  # path, sha256, config: what the Torch backend reloads
    if job.loras:
        manifest["loras"] = job.loras.save(out)  # DIR/loras/ copies: what reloads the DiT later fuses the same
    _copy_tree(ckpt / "tokenizer", out / "tokenizer")
    _copy_tree(ckpt / "scheduler", out / "scheduler")
    if variant == "edit":
        _copy_tree(ckpt / "siglip_processor", out / "siglip_processor")
    manifest_io.save(out, manifest)

    lean = _use_lean(lean, ckpt)
    manifest["export"] = {"lean": lean}

    # -- stage 2: export ------------------------------------------------------------------------------
    t0 = time.perf_counter()
    loaded: dict[str, torch.nn.Module] = {}
    bar = tqdm(v.components, desc="export", unit="graph", leave=False)
    for name in bar:
        bar.set_postfix_str(name)
        exported = base_precision(plan[name], t.base)
        key = _component_key(sha, name, exported, _dit_key(name, job.loras, job.controlnet))
        if name in manifest["components"]:
            log(f"[export] {name}: up to date, skipped")
            continue
        compute = COMPUTE[exported]
        if lean and LOADER_OF.get(name, name) in TEMPLATES:
            key_ = LOADER_OF.get(name, name)
            template, depth = _load_template(key_, ckpt, compute, loaded, job.controlnet)
            weights = stream_weights(ckpt, key_, **job.loras.kwargs(key_), **_cn_kwargs(job.controlnet, key_))
            entry = export_component(name, template, facts, compute, out / "onnx", variant, weights=weights,
                                     depth=depth)
        else:
            module = _load(name, ckpt, compute, loaded, job.loras, job.controlnet)
            entry = export_component(name, module, facts, compute, out / "onnx", variant)
        if lean:  # free what no later component needs (the lean path's point is bounded memory)
            later = {LOADER_OF.get(n, n) for n in v.components[v.components.index(name) + 1:]}
            for k in [k for k in loaded if k[0] not in later]:
                del loaded[k]
        # an engine of the previous build stays a candidate: its key (graph hash included) decides if it is current
        entry.update(key=key, precision=exported, status="complete",
                     engine=previous.get("components", {}).get(name, {}).get("engine"))
        manifest["components"][name] = entry
        manifest_io.save(out, manifest)
        log(f"[export] {name}: {entry['onnx']} ({entry['bytes'] / 1e6:.1f} MB, opset {OPSET})")
    manifest["stages"]["export"] = {"status": "done", "seconds": round(time.perf_counter() - t0, 2)}

    # -- stage 3: parity of the export against the Torch modules, before anything is spent on it --------------
    if parity and lean:
        manifest["stages"]["parity"] = {
            "status": "skipped", "reason": "lean export: comparing with the Torch modules would load the whole "
            "model; the lean path is checked against the ordinary one in the tests"}
    elif parity:
        t0 = time.perf_counter()
        failed = []
        for name in v.components:
            entry = manifest["components"][name]
            if "passed" not in entry.get("parity", {}):  # of the export; quantization: the quality gate
                exported = {**entry, **entry.get("unquantized", {})}
                entry["parity"] = _parity(name, exported, out, ckpt, loaded, facts, variant, job.loras,
                                          job.controlnet)
            if not entry["parity"]["passed"]:
                entry["status"], entry["rejected_by"] = "rejected", "parity"
                failed.append(name)
            log(f"[parity] {name}: {_fmt_parity(entry['parity'])}")
        manifest["stages"]["parity"] = {"status": "failed" if failed else "done",
                                        "seconds": round(time.perf_counter() - t0, 2)}
        if failed:
            manifest_io.save(out, manifest)
            worst = ", ".join(f"{n} rel_l2 {manifest['components'][n]['parity']['rel_l2']:.3g} "
                              f"(tolerance {manifest['components'][n]['parity']['tolerance']:g})" for n in failed)
            raise ParityFailed(f"parity check failed: {worst}. The exported graphs do not compute what the "
                               f"checkpoint's modules compute; the components are marked rejected and the runtime "
                               f"refuses them. Please report this with the checkpoint's configs; --skip-parity "
                               f"builds without the check")
    else:
        manifest["stages"]["parity"] = {"status": "skipped", "reason": "--skip-parity"}
    # -- stage 4: quantize -------------------------------------------------------------------------------
    if any(p in QUANTIZED for p in plan.values()):
        manifest["quantize_options"] = quant.as_dict()
    manifest["stages"]["quantize"] = quantize_stage(out, manifest, v, plan, quant, prompts, ckpt, log)
    manifest_io.save(out, manifest)
    if manifest["stages"]["quantize"]["status"] == "skipped":
        log(f"[quantize] skipped: {manifest['stages']['quantize']['reason']}")
    elif job.drop_intermediate:  # the unquantized graphs only serve the quality gate and rebuilds
        for name, entry in manifest["components"].items():
            unq = entry.get("unquantized")
            if unq and unq["onnx"] != entry["onnx"] and not unq.get("dropped"):
                _drop_graph(out, unq, log, f"{name} (unquantized)")
        manifest_io.save(out, manifest)

    # -- stage 5: engines -------------------------------------------------------------------------------
    if engine_builder is None:
        reason = ("target cpu runs the ONNX graphs with ONNX Runtime (or the Torch backend)" if t.flavour == "none"
                  else "--skip-engines: run the build again without it where the target's TensorRT is installed")
        manifest["stages"]["engines"] = {"status": "skipped", "reason": reason}
        log(f"[engines] skipped: {reason}")
    else:
        t0 = time.perf_counter()
        _build_engines(engine_builder, manifest, out, v, engine_shapes, log, job.drop_intermediate)
        manifest["stages"]["engines"] = {"status": "done", "seconds": round(time.perf_counter() - t0, 2)}

    if t.compute_capability is not None and v.name != "edit":  # the VRAM plan picks the runtime mode
        from .plan import make_plan

        vram = make_plan(target, precision, manifest["defaults"]["height"], manifest["defaults"]["width"],
                         variant, engine_dir=out)
        manifest["runtime"] = {"mode": vram.mode, "planned_at": [vram.height, vram.width],
                               "needs_gib": {m: round(b / (1 << 30), 2) for m, b in vram.modes.items()},
                               "memory_gib": round(vram.memory / (1 << 30), 1)}
        manifest_io.save(out, manifest)
        log(f"[plan] runtime mode {vram.mode} on {target} at {vram.height}x{vram.width}: all resident needs "
            f"{manifest['runtime']['needs_gib']['all-resident']} GiB of {manifest['runtime']['memory_gib']} "
            f"(python -m zimage_deploy.plan --engine-dir {out} for the table)")

    manifest["stages"]["total_seconds"] = round(time.perf_counter() - started, 2)
    manifest_io.save(out, manifest)
    log(f"[done] {out / manifest_io.NAME}")
    return out


def _previous_manifest(out: Path) -> dict:
    try:
        return manifest_io.load(out)
    except UserError:
        return {}


def _drop_graph(out: Path, entry: dict, log, what: str) -> None:
    """Delete a graph the runtime does not need (--drop-intermediate); the manifest keeps its hash and says so."""
    folder = out / Path(entry["onnx"]).parent
    if folder.is_dir():
        size = sum(p.stat().st_size for p in folder.iterdir())
        shutil.rmtree(folder)
        log(f"[drop] {what}: {folder.relative_to(out)} ({size / 2**30:.2f} GiB)")
    entry["dropped"] = True


def _build_engines(builder: EngineBuilder, manifest: dict, out: Path, variant, shapes: dict, log,
                   drop: bool = False) -> None:
    """One engine per component; an engine whose key (ONNX hash, flavour, version, SM, profile, options) is
    unchanged and whose plan file is intact is kept. `drop`: each graph whose plan holds its weights is deleted
    once the plan is written (the TensorRT runtime reads plans only; a rebuild exports again)."""
    bar = tqdm(variant.components, desc=f"engines ({builder.target.flavour} {builder.target.sm})", unit="engine",
               leave=False)
    for name in bar:
        bar.set_postfix_str(name)
        comp = manifest["components"][name]
        key = builder.key(comp["onnx_sha256"], shapes[name])
        old = comp.get("engine") or {}
        plan = out / "engines" / f"{name}.plan"
        if old.get("key") == key and old.get("status") == "complete" and plan.is_file() \
                and sha256_file(plan) == old.get("plan_sha256"):
            log(f"[engines] {name}: up to date, skipped")
            if drop and not old.get("stripped") and not comp.get("dropped"):
                _drop_graph(out, comp, log, name)
                manifest_io.save(out, manifest)
            continue
        comp["engine"] = None
        entry = builder.build(out / comp["onnx"], shapes[name], plan,
                              strip=builder.strips(bool(comp.get("external_data"))))
        entry.update(plan=f"engines/{name}.plan", key=key, status="complete")
        comp["engine"] = entry
        manifest_io.save(out, manifest)
        if drop and not entry["stripped"]:
            _drop_graph(out, comp, log, name)
            manifest_io.save(out, manifest)
        log(f"[engines] {name}: {entry['plan']} ({entry['bytes'] / 1e6:.1f} MB, {entry['build_seconds']:.1f} s, "
            f"{entry['flavour']} {entry['version']} {builder.target.sm})")


LEAN_AUTO_BYTES = 4 << 30


def _use_lean(lean: str, ckpt: Path) -> bool:
    """`auto`: lean when the DiT and text-encoder weights together exceed 4 GiB."""
    if lean in ("on", "off"):
        return lean == "on"
    size = sum(p.stat().st_size for f in ("transformer", "text_encoder") for p in (ckpt / f).glob("*.safetensors"))
    return size > LEAN_AUTO_BYTES


def _up_to_date(previous: dict, out: Path, sha: str, plan: dict, names, base: str, loras: BuildLoras,
                controlnet: BuildControlNet | None = None) -> dict:
    """Components of a previous build in `out` whose exported graph was made from the same inputs and is intact
    (a quantized component keeps its quantized graph only if the quantize stage finds it up to date too)."""
    kept = {}
    for name in names:
        old = previous.get("components", {}).get(name, {})
        exported = old.get("unquantized", old)
        folder = out / "onnx" / name
        if old.get("key") == _component_key(sha, name, base_precision(plan[name], base),
                                            _dit_key(name, loras, controlnet)) \
                and old.get("status") in ("complete", "rejected") and old.get("rejected_by") != "parity" \
                and folder.is_dir() and file_hash(folder) == exported.get("onnx_sha256"):
            if plan[name] in QUANTIZED:
                kept[name] = old
            else:  # no longer quantized: back to the exported graph
                back = {k: v for k, v in {**old, **exported}.items() if k not in ("unquantized", "quantization")}
                kept[name] = {**back, "status": "complete"}
    return kept


def _dit_key(name: str, loras: BuildLoras, controlnet: BuildControlNet | None) -> str:
    """What fused LoRAs and a ControlNet add to a component's up-to-date key."""
    return loras.key_for(name) + (controlnet.key_for(name) if controlnet else "")


def _cn_kwargs(controlnet: BuildControlNet | None, loader: str) -> dict:
    return controlnet.kwargs(loader) if controlnet else {}


def _load_template(key: str, ckpt: Path, compute: torch.dtype, loaded: dict, controlnet=None):
    if (key, compute, "template") not in loaded:
        loaded[(key, compute, "template")] = TEMPLATES[key](ckpt, compute, **_cn_kwargs(controlnet, key))
    return loaded[(key, compute, "template")]


def _load(name: str, ckpt: Path, compute: torch.dtype, loaded: dict,
          loras: BuildLoras | None = None, controlnet: BuildControlNet | None = None) -> torch.nn.Module:
    from .models.load import LOADERS

    key = (LOADER_OF.get(name, name), compute)
    if key not in loaded:
        loaded[key] = LOADERS[key[0]](ckpt, compute, **(loras.kwargs(key[0]) if loras else {}),
                                      **_cn_kwargs(controlnet, key[0]))
    return loaded[key]


def _metrics(got: torch.Tensor, ref: torch.Tensor) -> dict:
    got, ref = got.float(), ref.float()
    diff, norm = float((got - ref).norm()), float(ref.norm())
    # an all-zero reference (a default-initialised ControlNet's zero projections) is matched only by zeros
    rel = diff / norm if norm > 0 else (0.0 if diff == 0 else float("inf"))
    return {"max_abs": float((got - ref).abs().max()), "rel_l2": rel}


@torch.no_grad()
def _parity(name: str, entry: dict, out: Path, ckpt: Path, loaded: dict, facts: dict, variant: str,
            loras: BuildLoras | None = None, controlnet: BuildControlNet | None = None) -> dict:
    """fp32: ONNX Runtime on the graph vs the Torch module, at shapes other than the traced ones.
    bf16: ONNX Runtime has no BF16 CPU kernels, so the Torch BF16 module is measured against float32."""
    compute = DTYPES[entry["compute_dtype"]]
    spec = specs_for(variant, facts)[name]
    sample = spec.sample(facts, CHECK_DIMS, compute)
    fp32_module = spec.wrap(_load(name, ckpt, torch.float32, loaded, loras, controlnet))
    ref = _flat(fp32_module(*[s.float() if s.is_floating_point() else s for s in sample]))
    if compute == torch.float32:
        import onnxruntime as ort

        sess = ort.InferenceSession(str(out / entry["onnx"]), providers=["CPUExecutionProvider"])
        feeds = {io.name: s.numpy() for io, s in zip(spec.inputs, sample)}
        got = _flat(tuple(torch.from_numpy(o) for o in sess.run(None, feeds)))
        how = "onnxruntime graph vs torch float32 module"
    else:
        got = _flat(spec.wrap(_load(name, ckpt, compute, loaded, loras, controlnet))(*sample))
        how = "torch bf16 module vs torch float32 module (onnxruntime has no BF16 CPU kernels)"
    if name == "text_encoder":  # only real tokens are used downstream
        keep = sample[1].bool()
        got, ref = got[keep], ref[keep]
    metrics = _metrics(got, ref)
    tolerance = spec.parity_rel_l2[entry["compute_dtype"]]
    passed = bool(math.isfinite(metrics["rel_l2"]) and metrics["rel_l2"] <= tolerance)
    return {"method": how, "shapes": CHECK_DIMS, **metrics, "tolerance": tolerance, "passed": passed}


def _flat(out) -> torch.Tensor:
    """A module's or a graph's outputs as one tensor (several outputs concatenated, flattened)."""
    if isinstance(out, (tuple, list)):
        return torch.cat([o.float().flatten() for o in out]) if len(out) > 1 else out[0]
    return out


def _fmt_parity(p: dict) -> str:
    verdict = "ok" if p.get("passed", True) else "OVER TOLERANCE"
    return (f"max_abs {p['max_abs']:.2e}, rel_l2 {p['rel_l2']:.2e} <= {p.get('tolerance', float('nan')):g}: "
            f"{verdict} ({p['method']})")


def _size(text: str) -> tuple[int, int]:
    try:
        h, w = (int(x) for x in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected HxW, e.g. 1024x1024, got {text!r}") from None
    return h, w


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m zimage_deploy.build", description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="tiny",
                    help="'tiny' / 'tiny-base' / 'tiny-edit' (embedded test checkpoints, written to "
                         "$ZIMAGE_DEPLOY_CACHE or ~/.cache/zimage_deploy on first use), a diffusers-layout "
                         "directory, or a hub id (default: %(default)s)")
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
    q = ap.add_argument_group("quantization (--precision fp8 / int4; nvfp4 for Blackwell: rtx5090, b200)")
    q.add_argument("--text-encoder-precision", default=None, choices=TEXT_ENCODER_PRECISIONS,
                   help="text encoder precision (default: int4 with --precision int4, else not quantized; "
                        "bf16 = not quantized, float32 on the cpu target)")
    q.add_argument("--calib-prompts", type=Path, default=None,
                   help="calibration prompts, one per line (default: the 72 EN/ZH prompts shipped)")
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
    eng = ap.add_argument_group("engines (GPU targets)")
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
                          "(auto: graphs above 512 MiB of weights, i.e. the real-size DiT and text encoder, when a GPU "
                          "is present: TensorRT-RTX cannot build refittable plans ahead of time without one; "
                          "default: %(default)s)")
    ap.add_argument("--drop-intermediate", action="store_true",
                    help="delete what the runtime does not need as soon as it is used: unquantized graphs after "
                         "quantization, and (GPU targets) each graph once its engine plan holds its weights; halves "
                         "the build folder of real-size builds, but a rebuild exports again and only the TensorRT "
                         "backend can run the build (default: keep everything)")
    eng.add_argument("--weight-streaming", action="store_true", help="allow weight streaming (small-memory cards; default: off)")
    args = ap.parse_args(argv)
    precision = args.precision or TARGETS[args.target].default_precision
    opts = EngineOptions(opt_level=args.opt_level, max_batch=args.max_batch, min_side=args.min_side,
                         max_side=args.max_side, opt_side=args.opt_side, static=args.static,
                         static_batch=args.static_batch, refittable=args.refittable,
                         weight_streaming=args.weight_streaming, strip_weights=args.strip_weights)
    quant = QuantOptions(calib_prompts=args.calib_prompts, calib_size=args.calib_size, calib_side=args.calib_side,
                         calib_steps=args.calib_steps,
                         int4_method=args.int4_method, int4_block=args.int4_block, fp8_attention=args.fp8_attention,
                         exclude=tuple(e.strip() for e in args.quant_exclude.split(",") if e.strip()),
                         gate=not args.no_quality_gate, gate_prompts=args.gate_prompts, min_psnr=args.min_psnr,
                         min_cosine=args.min_cosine)
    build(args.model, args.variant, args.target, precision, args.out, parity=not args.skip_parity, engine_opts=opts,
          lean=args.lean, quant=quant, text_encoder_precision=args.text_encoder_precision,
          engines=not args.skip_engines, loras=args.lora, drop_intermediate=args.drop_intermediate,
          controlnet=args.controlnet)
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
