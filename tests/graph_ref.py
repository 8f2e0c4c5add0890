"""Test helpers that compute exported graphs on the CPU where ONNX Runtime cannot run them as they are, and read
intermediate values out of a graph. Written for the tests, independent of the package's own code.

- `float32_copy`: a BF16 graph as float32 with every BF16 value rounded to BF16 where the graph produces it
  (`Cast` to BF16 and back after each node whose output is BF16; BF16 initializers and constants widened
  exactly). Each op then computes in float32 and rounds its result to BF16 once, which is what PyTorch's BF16
  CPU kernels and TensorRT's BF16 layers do; ONNX Runtime runs the copy. (ONNX Runtime has no BF16 CPU kernels,
  and onnx's reference evaluator computes numpy-style on ml_dtypes.bfloat16: it returns float32 from MatMul and
  accumulates reductions in BF16, neither of which is the BF16 arithmetic of the deployed engines.)
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

BF16, FLOAT = TensorProto.BFLOAT16, TensorProto.FLOAT
# ops whose output values are some of their input values: no rounding needed after them
_MOVES = {"Reshape", "Transpose", "Gather", "Slice", "Concat", "Split", "Squeeze", "Unsqueeze", "Expand", "Where",
          "Identity", "Tile", "Flatten"}


def load(path: Path) -> onnx.ModelProto:
    return onnx.load(str(path), load_external_data=True)


def elem_types(model: onnx.ModelProto) -> dict[str, int]:
    """Element type of every value of the graph (after onnx's shape inference)."""
    inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False)
    g = inferred.graph
    types = {v.name: v.type.tensor_type.elem_type for v in [*g.value_info, *g.input, *g.output]}
    types.update({t.name: t.data_type for t in g.initializer})
    for n in g.node:  # what inference may leave out (custom domains)
        if n.op_type == "Cast":
            types[n.output[0]] = next(a.i for a in n.attribute if a.name == "to")
        elif n.op_type == "Constant":
            types[n.output[0]] = next(a.t.data_type for a in n.attribute if a.name == "value")
    return types


def float32_copy(model: onnx.ModelProto, round_types=(BF16,)) -> onnx.ModelProto:
    """A float32 copy of a BF16 graph that rounds every BF16 value to BF16 (module docstring). `round_types`
    (FLOAT added): round the float32 values too, as a graph without float32 islands would compute."""
    types = elem_types(model)
    out = onnx.ModelProto()
    out.CopyFrom(model)
    g = out.graph
    for t in g.initializer:
        if t.data_type == BF16:
            t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t).astype(np.float32), t.name))
    nodes = []
    for n in g.node:
        for a in n.attribute:
            if a.type == onnx.AttributeProto.TENSOR and a.t.data_type == BF16:
                a.t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(a.t).astype(np.float32), a.t.name))
        nodes.append(n)
        if n.op_type in _MOVES or n.op_type == "Constant":
            continue
        for i, name in enumerate(n.output):
            if types.get(name) not in round_types:
                continue
            if n.op_type == "Cast":  # keep the cast to BF16 (the rounding), then back to float32
                n.output[i] = name + "/bf16"
                nodes.append(helper.make_node("Cast", [name + "/bf16"], [name], to=FLOAT))
            else:
                n.output[i] = name + "/f32"
                nodes.append(helper.make_node("Cast", [name + "/f32"], [name + "/bf16"], to=BF16))
                nodes.append(helper.make_node("Cast", [name + "/bf16"], [name], to=FLOAT))
    del g.node[:]
    g.node.extend(nodes)
    for v in [*g.input, *g.output]:
        if v.type.tensor_type.elem_type == BF16:
            v.type.tensor_type.elem_type = FLOAT
    del g.value_info[:]
    return out


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
