"""Export one component to ONNX: trace (weights as named inputs), deepen a two-layer template if asked,
attach the weights (external data above 512 MiB), check on the path, infer shapes, describe the graph's I/O for
the manifest. Written into a temp folder and renamed when complete."""

from __future__ import annotations

import warnings
from pathlib import Path

import onnx
import torch

from ..buildfolder import BuildFolder
from ..components import REPEATED_BLOCKS
from ..fsutil import atomic_dir
from ..hashing import folder_sha256
from .specs import STATIC_DIMS, TRACE_DIMS, describe_io, specs_for
from .stamp import stamp_layers
from .weights import attach_weights, module_weights

EXPORT_FORMAT = 3  # bump when the exported graphs change for the same inputs (keys of up-to-date checks)
OPSET = 19  # FP8 Q/DQ (the quantization stage) needs >= 19; TorchScript exporter max is 20
ONNX_DTYPES = {onnx.TensorProto.FLOAT: "float32", onnx.TensorProto.BFLOAT16: "bfloat16",
               onnx.TensorProto.INT64: "int64", onnx.TensorProto.INT32: "int32", onnx.TensorProto.FLOAT16: "float16"}


def export_component(name: str, model: torch.nn.Module, facts: dict, compute: torch.dtype, out_dir: Path,
                     variant: str = "turbo", weights=None, depth: int | None = None) -> dict:
    """Export component `name` of `model` into `out_dir/name/model.onnx` (+ model.onnx.data above 512 MiB).

    The graph is traced with the weights as named inputs (`keep_initializers_as_inputs=True` also turns off the
    TorchScript exporter's value-based initializer deduplication, which merged equal-valued parameters such as
    norm gains of ones or zero pad tokens and left nodes reading a removed input), optionally deepened to `depth` main layers (a
    template traced with two layers: the memory-lean path), then the weights are attached from `weights`
    ((name, tensor) pairs in the model's naming, e.g. streamed from the checkpoint) or from `model` itself.
    Returns the manifest entry: path, hash, opset, size, I/O names with dtypes and dims."""
    spec = specs_for(variant, facts)[name]
    wrapper = spec.wrap(model).eval()
    prefix = "" if wrapper is model else next(n for n, m in wrapper.named_children() if m is model) + "."
    sample = spec.sample(facts, TRACE_DIMS, compute)
    dynamic_axes = {}
    for io in spec.inputs + spec.outputs:
        axes = {i: d for i, d in enumerate(io.dims) if isinstance(d, str) and d not in STATIC_DIMS}
        if axes:
            dynamic_axes[io.name] = axes

    with atomic_dir(out_dir / name) as tmp:
        path = tmp / "model.onnx"
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # TorchScript-exporter deprecation and tracer notices
            torch.onnx.export(
                wrapper, sample, str(path), dynamo=False, opset_version=OPSET, export_params=False,
                do_constant_folding=False, keep_initializers_as_inputs=True, input_names=[i.name for i in spec.inputs],
                output_names=[o.name for o in spec.outputs], dynamic_axes=dynamic_axes,
            )
        graph = onnx.load(str(path))
        if depth is not None and depth > 2 and name in REPEATED_BLOCKS:
            stamp_layers(graph, depth, prefix=prefix + REPEATED_BLOCKS[name], scope=REPEATED_BLOCKS[name])
        source = ((prefix + k, v) for k, v in (weights if weights is not None else module_weights(model)))
        io_names = {io.name for io in spec.inputs + spec.outputs}
        summary = attach_weights(graph, io_names, source, tmp, strip_prefix=prefix)
        onnx.save_model(graph, str(path))
        del graph
        onnx.checker.check_model(str(path), full_check=False)
        onnx.shape_inference.infer_shapes_path(str(path), str(path))
        _declare_static_dims(path, spec, facts)
        io_graph = onnx.load(str(path), load_external_data=False).graph
        entry = {
            "onnx": BuildFolder.graph_rel(name),
            "opset": OPSET,
            **_checked_io(spec, io_graph, facts, compute),
            "external_data": summary["external_data"],
            "initializers": summary["initializers"],
            "weight_bytes": summary["weight_bytes"],
            "bytes": sum(p.stat().st_size for p in tmp.iterdir()),
            "onnx_sha256": folder_sha256(tmp),
        }
    return entry


def _declare_static_dims(path: Path, spec, facts: dict) -> None:
    """Graph outputs declare the spec's static sizes (the exporter leaves some as symbols, e.g. the VAE encoder's
    16 latent channels); the proto is rewritten without its external data (that file stays as it is)."""
    from .specs import resolve_dims

    model = onnx.load(str(path), load_external_data=False)
    outputs = {o.name: o for o in model.graph.output}
    changed = False
    for io in spec.outputs:
        dims = outputs[io.name].type.tensor_type.shape.dim if io.name in outputs else []
        for d, size in zip(dims, resolve_dims(io.dims, facts)):
            if isinstance(size, int) and d.dim_value != size:
                d.Clear()
                d.dim_value = size
                changed = True
    if changed:
        onnx.save_model(model, str(path))


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
