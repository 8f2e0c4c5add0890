"""Test helpers that compute exported graphs on the CPU where ONNX Runtime cannot run them as they are, and read
intermediate values out of a graph.

- `float32_copy`, `elem_types`: the package's BF16 graph evaluation (zimage_deploy/export/graph_eval.py, which
  the parity stage uses too), re-exported for the tests.
- `with_outputs`: the same graph with intermediate values added to its outputs.
- `TRT_FP4DynamicQuantize`: TensorRT's dynamic FP4 quantization for onnx's reference evaluator, with numpy and
  ml_dtypes.
"""

from __future__ import annotations

from pathlib import Path

import ml_dtypes
import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper
from onnx.reference.op_run import OpRun

from zimage_deploy.export.graph_eval import elem_types, float32_copy  # noqa: F401 - re-exported

BF16, FLOAT = TensorProto.BFLOAT16, TensorProto.FLOAT


def load(path: Path) -> onnx.ModelProto:
    return onnx.load(str(path), load_external_data=True)


def with_outputs(model: onnx.ModelProto, names: list[str]) -> onnx.ModelProto:
    """The graph with `names` (intermediate values) appended to its outputs, types left to the runtime."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    known = {o.name for o in out.graph.output}
    out.graph.output.extend(helper.make_empty_tensor_value_info(n) for n in names if n not in known)
    return out


def producers(model: onnx.ModelProto) -> dict[str, onnx.NodeProto]:
    return {o: n for n in model.graph.node for o in n.output}


def initializer(model: onnx.ModelProto, name: str, folder: Path | None = None) -> np.ndarray:
    """An initializer as numpy (FLOAT8 / INT4 / FLOAT4 / BF16 as onnx's own numpy_helper unpacks them)."""
    t = next(t for t in model.graph.initializer if t.name == name)
    if t.data_location == TensorProto.EXTERNAL and folder is not None:
        onnx.external_data_helper.load_external_data_for_tensor(t, str(folder))
    return numpy_helper.to_array(t)


class TRT_FP4DynamicQuantize(OpRun):
    """TensorRT's dynamic FP4 quantization, written with numpy and ml_dtypes (independent of the package's
    numerics.py): per block of 16 along the last axis, scale = amax / 6 / global as FP8 E4M3, values
    x / (scale * global) as E2M1 (round to nearest even, saturating at 6)."""
    op_domain = "trt"

    def _run(self, x, global_scale, axis=None, block_size=None, scale_type=None):
        assert axis == -1 and block_size == 16 and scale_type == TensorProto.FLOAT8E4M3FN
        g = np.float32(global_scale)
        blocks = x.astype(np.float32).reshape(*x.shape[:-1], -1, 16)
        s8 = (np.abs(blocks).max(-1) / 6 / g).clip(max=448).astype(ml_dtypes.float8_e4m3fn)
        eff = s8.astype(np.float32) * g
        with np.errstate(divide="ignore", invalid="ignore"):
            v = np.where(eff[..., None] > 0, blocks / eff[..., None], 0).clip(-6, 6)
        return v.astype(ml_dtypes.float4_e2m1fn).reshape(x.shape), s8


def linear_io(model: onnx.ModelProto, layer: str) -> tuple[str, str]:
    """(activation, output) of linear layer `layer`'s MatMul (its weight initializer `layer.weight`, or the value
    a dequantization writes under that name, read directly or through a Transpose): the activation as it arrives,
    before the quantizer's nodes (named /quant...), and the MatMul's output."""
    prod = producers(model)
    weight = layer + ".weight"
    for n in model.graph.node:
        w = prod.get(n.input[1]) if n.op_type == "MatMul" else None
        if n.op_type == "MatMul" and (n.input[1] == weight or (w is not None and w.op_type == "Transpose"
                                                                and w.input[0] == weight)):
            x = n.input[0]
            while x in prod and prod[x].name.startswith("/quant"):
                x = prod[x].input[0]
            return x, n.output[0]
    raise KeyError(f"no MatMul reads {weight}")
