"""Export one component to ONNX: trace, externalise weights above 2 GB, check on the path, infer shapes,
describe the graph's I/O for the manifest. Written into a temp folder and renamed when complete."""

from __future__ import annotations

import hashlib
import shutil
import tempfile
import warnings
from pathlib import Path

import onnx
import torch

from .specs import STATIC_DIMS, TRACE_DIMS, describe_io, specs_for

OPSET = 19  # FP8 Q/DQ (the quantization stage) needs >= 19; TorchScript exporter max is 20
TWO_GB = 2**31 - 1
DATA_FILE = "model.onnx.data"
ONNX_DTYPES = {onnx.TensorProto.FLOAT: "float32", onnx.TensorProto.BFLOAT16: "bfloat16",
               onnx.TensorProto.INT64: "int64", onnx.TensorProto.INT32: "int32", onnx.TensorProto.FLOAT16: "float16"}


def file_hash(folder: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(folder.iterdir()):
        h.update(p.name.encode() + b"\0")
        with open(p, "rb") as f:
            while chunk := f.read(1 << 24):
                h.update(chunk)
    return h.hexdigest()


def export_component(name: str, model: torch.nn.Module, facts: dict, compute: torch.dtype, out_dir: Path,
                     variant: str = "turbo") -> dict:
    """Export `model` (a loaded module for component `name`) into `out_dir/name/model.onnx`.

    Returns the manifest entry: path, hash, opset, size, I/O names with dtypes and dims."""
    spec = specs_for(variant)[name]
    wrapper = spec.wrap(model).eval()
    sample = spec.sample(facts, TRACE_DIMS, compute)
    dynamic_axes = {}
    for io in spec.inputs + spec.outputs:
        axes = {i: d for i, d in enumerate(io.dims) if isinstance(d, str) and d not in STATIC_DIMS}
        if axes:
            dynamic_axes[io.name] = axes

    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{name}-", dir=out_dir))
    try:
        path = tmp / "model.onnx"
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # TorchScript-exporter deprecation and tracer notices
            torch.onnx.export(
                wrapper, sample, str(path), dynamo=False, opset_version=OPSET,
                input_names=[i.name for i in spec.inputs], output_names=[o.name for o in spec.outputs],
                dynamic_axes=dynamic_axes, do_constant_folding=True,
            )
        _consolidate_external_data(path)
        onnx.checker.check_model(str(path), full_check=False)
        onnx.shape_inference.infer_shapes_path(str(path), str(path))
        graph = onnx.load(str(path), load_external_data=False).graph
        entry = {
            "onnx": f"onnx/{name}/model.onnx",
            "opset": OPSET,
            **_checked_io(spec, graph, facts, compute),
            "external_data": (tmp / DATA_FILE).exists(),
            "bytes": sum(p.stat().st_size for p in tmp.iterdir()),
            "onnx_sha256": file_hash(tmp),
        }
        final = out_dir / name
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
        return entry
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _consolidate_external_data(path: Path) -> None:
    """Above 2 GB the weights go to one external data file beside the graph (the exporter may scatter them)."""
    folder = path.parent
    scattered = [p for p in folder.iterdir() if p.name != path.name]
    if not scattered and path.stat().st_size < TWO_GB:
        return
    model = onnx.load(str(path), load_external_data=True)
    for p in scattered:
        p.unlink()
    onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=DATA_FILE, size_threshold=1024)


def _checked_io(spec, graph, facts, compute) -> dict:
    """The spec's I/O description, after checking the graph has those names and dtypes."""
    described = describe_io(spec, facts, compute)
    values = {v.name: v for v in list(graph.input) + list(graph.output)}
    for io in described["inputs"] + described["outputs"]:
        if io["name"] not in values:
            raise RuntimeError(f"the exported graph has no {io['name']!r} (was it unused, and pruned?)")
        elem = values[io["name"]].type.tensor_type.elem_type
        if ONNX_DTYPES.get(elem, str(elem)) != io["dtype"]:
            raise RuntimeError(f"exported {io['name']} has dtype {ONNX_DTYPES.get(elem, elem)}, expected {io['dtype']}")
    return described
