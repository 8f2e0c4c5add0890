"""The parity stage: the exported graphs against the Torch modules they were exported from, right after the
export (before quantization and engines are spent on a wrong graph). A component over its tolerance is marked
rejected (the runtime refuses it) and fails the build."""

from __future__ import annotations

import math
import time

import torch

from .. import manifest as manifest_io
from ..buildfolder import BuildFolder
from ..errors import UserError
from .specs import CHECK_DIMS, DTYPES, specs_for


class ParityFailed(UserError):
    """Exported graphs differ from the Torch modules by more than their declared tolerance."""


def parity_stage(job, manifest: dict) -> dict:
    """Check every component not checked yet; returns the stage's manifest record. Raises ParityFailed (after
    recording why)."""
    if not job.parity:
        return {"status": "skipped", "reason": "--skip-parity"}
    if manifest["export"]["lean"]:
        return {"status": "skipped", "reason": "lean export: comparing with the Torch modules would load the whole "
                "model; the lean path is checked against the ordinary one in the tests"}
    t0 = time.perf_counter()
    failed = []
    for name in job.v.components:
        entry = manifest["components"][name]
        if "passed" not in entry.get("parity", {}):  # of the export; quantization: the quality gate
            entry["parity"] = _parity(job, name, {**entry, **entry.get("unquantized", {})})
        if not entry["parity"]["passed"]:
            entry["status"], entry["rejected_by"] = "rejected", "parity"
            failed.append(name)
        job.log(f"[parity] {name}: {_fmt_parity(entry['parity'])}")
    record = {"status": "failed" if failed else "done", "seconds": round(time.perf_counter() - t0, 2)}
    if failed:
        manifest["stages"]["parity"] = record
        manifest_io.save(job.out, manifest)
        worst = ", ".join(f"{n} rel_l2 {manifest['components'][n]['parity']['rel_l2']:.3g} "
                          f"(tolerance {manifest['components'][n]['parity']['tolerance']:g})" for n in failed)
        raise ParityFailed(f"parity check failed: {worst}. The exported graphs do not compute what the "
                           f"checkpoint's modules compute; the components are marked rejected and the runtime "
                           f"refuses them. Please report this with the checkpoint's configs; --skip-parity "
                           f"builds without the check")
    return record


def _metrics(got: torch.Tensor, ref: torch.Tensor) -> dict:
    got, ref = got.float(), ref.float()
    diff, norm = float((got - ref).norm()), float(ref.norm())
    # an all-zero reference (a default-initialised ControlNet's zero projections) is matched only by zeros
    rel = diff / norm if norm > 0 else (0.0 if diff == 0 else float("inf"))
    return {"max_abs": float((got - ref).abs().max()), "rel_l2": rel}


@torch.no_grad()
def _parity(job, name: str, entry: dict) -> dict:
    """fp32: ONNX Runtime on the graph vs the Torch module, at shapes other than the traced ones.
    bf16: ONNX Runtime has no BF16 CPU kernels, so the Torch BF16 module is measured against float32."""
    compute = DTYPES[entry["compute_dtype"]]
    spec = specs_for(job.v.name, job.facts)[name]
    sample = spec.sample(job.facts, CHECK_DIMS, compute)
    fp32_module = spec.wrap(job.modules.module(name, torch.float32))
    ref = _flat(fp32_module(*[s.float() if s.is_floating_point() else s for s in sample]))
    if compute == torch.float32:
        import onnxruntime as ort

        sess = ort.InferenceSession(str(BuildFolder(job.out).file(entry["onnx"])), providers=["CPUExecutionProvider"])
        feeds = {io.name: s.numpy() for io, s in zip(spec.inputs, sample)}
        got = _flat(tuple(torch.from_numpy(o) for o in sess.run(None, feeds)))
        how = "onnxruntime graph vs torch float32 module"
    else:
        got = _flat(spec.wrap(job.modules.module(name, compute))(*sample))
        how = "torch bf16 module vs torch float32 module (onnxruntime has no BF16 CPU kernels)"
    if spec.used_where:
        keep = sample[[io.name for io in spec.inputs].index(spec.used_where)].bool()
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
