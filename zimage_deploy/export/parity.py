"""The parity stage: the exported graphs against the Torch modules they were exported from, right after the
export (before quantization and engines are spent on a wrong graph). A component over its tolerance is marked
rejected (the runtime refuses it) and fails the build."""

from __future__ import annotations

import math
import time

import onnx
import torch
from onnx import helper

from .. import manifest as manifest_io
from ..buildfolder import BuildFolder
from ..components import REPEATED_BLOCKS
from ..errors import UserError
from .graph_eval import float32_copy, session
from .lean_parity import block_scope, cut, hook_blocks, lean_reference
from .specs import CHECK_DIMS, DTYPES, specs_for


class ParityFailed(UserError):
    """Exported graphs differ from the Torch modules by more than their declared tolerance."""


def parity_stage(job, manifest: dict) -> dict:
    """Check every component not checked yet; returns the stage's manifest record. Raises ParityFailed (after
    recording why)."""
    if not job.parity:
        return {"status": "skipped", "reason": "--skip-parity"}
    if not job.graphs:
        return {"status": "skipped", "reason": "no graphs: the Torch runtime runs the checkpoint's own modules"}
    lean = manifest["export"]["lean"]
    t0 = time.perf_counter()
    failed = []
    for name in job.v.components:
        entry = manifest["components"][name]
        if "passed" not in entry.get("parity", {}):  # of the export; quantization: the quality gate
            entry["parity"] = _parity(job, name, {**entry, **entry.get("unquantized", {})}, lean)
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
def _parity(job, name: str, entry: dict, lean: bool) -> dict:
    """The graph itself on ONNX Runtime (a BF16 graph as float32 with its BF16 roundings: graph_eval.py) against
    the float32 Torch module, at shapes other than the traced ones. Lean exports: the graph cut to a sample of
    its blocks against a Torch module of those blocks, weights streamed (lean_parity.py)."""
    compute = DTYPES[entry["compute_dtype"]]
    spec = specs_for(job.v.name, job.facts)[name]
    sample = spec.sample(job.facts, CHECK_DIMS, compute)
    path = BuildFolder(job.out).file(entry["onnx"])
    graph = onnx.load(str(path), load_external_data=False)
    blocks, keep, depth, hooked = [], None, None, {}
    if lean and job.modules.has_template(name):
        module, keep, depth = lean_reference(job, name)
        if name in REPEATED_BLOCKS:
            graph, blocks = cut(graph, block_scope(spec, module, name), depth, keep)
            hooked = hook_blocks(module, name, keep)
            how = f"onnxruntime graph cut to blocks {keep} of {depth} (embedders, refiners, final layer whole) vs " \
                  f"torch float32 module of the same blocks, weights streamed"
        else:
            how = "onnxruntime graph vs torch float32 module, weights streamed"
    else:
        module = job.modules.module(name, torch.float32)
        how = "onnxruntime graph vs torch float32 module"
    if compute != torch.float32:
        graph = float32_copy(graph)
        how = f"{how}; the BF16 graph evaluated in float32 with its BF16 roundings"
    graph.graph.output.extend(helper.make_empty_tensor_value_info(v) for v in blocks)
    floats = [s.float() if s.is_floating_point() else s for s in sample]
    ref = spec.wrap(module)(*floats)
    del module  # a lean reference is freed before ONNX Runtime reads the cut graph's weights
    outs = session(graph, path.parent).run(None, {io.name: s.numpy() for io, s in zip(spec.inputs, floats)})
    n_out = len(spec.outputs)
    got, ref = _flat(tuple(torch.from_numpy(o) for o in outs[:n_out])), _flat(ref)
    keep_rows = sample[[io.name for io in spec.inputs].index(spec.used_where)].bool() if spec.used_where else None
    if keep_rows is not None:
        got, ref = got[keep_rows], ref[keep_rows]
    tolerance = spec.parity_rel_l2[entry["compute_dtype"]]
    record = {"method": how, "shapes": CHECK_DIMS, **_metrics(got, ref), "tolerance": tolerance}
    passed = _within(record["rel_l2"], tolerance)
    if blocks:
        figures = []
        for k, value in zip(keep, outs[n_out:]):
            g, r = torch.from_numpy(value), hooked[k].float()
            if keep_rows is not None and tuple(g.shape[:2]) == tuple(keep_rows.shape):
                g, r = g[keep_rows], r[keep_rows]
            figures.append({"block": k, **_metrics(g, r)})
            passed = passed and _within(figures[-1]["rel_l2"], tolerance)
        record["blocks"] = {"checked": keep, "of": depth, "outputs": figures}
    return {**record, "passed": passed}


def _within(rel: float, tolerance: float) -> bool:
    return bool(math.isfinite(rel) and rel <= tolerance)


def _flat(out) -> torch.Tensor:
    """A module's or a graph's outputs as one tensor (several outputs concatenated, flattened)."""
    if isinstance(out, (tuple, list)):
        return torch.cat([o.float().flatten() for o in out]) if len(out) > 1 else out[0]
    return out


def _fmt_parity(p: dict) -> str:
    verdict = "ok" if p.get("passed", True) else "OVER TOLERANCE"
    return (f"max_abs {p['max_abs']:.2e}, rel_l2 {p['rel_l2']:.2e} <= {p.get('tolerance', float('nan')):g}: "
            f"{verdict} ({p['method']})")
