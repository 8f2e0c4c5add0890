"""Evaluate exported graphs on the CPU where ONNX Runtime cannot run them as they are.

- `float32_copy`: a BF16 graph as float32 with every BF16 value rounded to BF16 where the graph produces it
  (`Cast` to BF16 and back after each node whose output is BF16; BF16 initializers and constants widened
  exactly, initializers through a `Cast` node so that external data is never read into the proto). Each op then
  computes in float32 and rounds its result to BF16 once, which is what PyTorch's BF16 CPU kernels and TensorRT's
  BF16 layers do; ONNX Runtime runs the copy. (ONNX Runtime has no BF16 CPU kernels, and onnx's reference
  evaluator computes numpy-style on ml_dtypes.bfloat16: it returns float32 from MatMul and accumulates reductions
  in BF16, neither of which is the BF16 arithmetic of the deployed engines.)
- `session`: an ONNX Runtime session on a graph proto whose initializers may live in the external data file of
  the folder it was loaded from (only the initializers the proto still names are read).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

BF16, FLOAT = TensorProto.BFLOAT16, TensorProto.FLOAT
# ops whose output values are some of their input values: no rounding needed after them
_MOVES = {"Reshape", "Transpose", "Gather", "Slice", "Concat", "Split", "Squeeze", "Unsqueeze", "Expand", "Where",
          "Identity", "Tile", "Flatten"}


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
    nodes = []
    for t in g.initializer:  # BF16 weights stay BF16 (and external); readers get them widened by a Cast
        if t.data_type == BF16:
            nodes.append(helper.make_node("Cast", [t.name + "/bf16w"], [t.name], to=FLOAT))
            t.name += "/bf16w"
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


def session(model: onnx.ModelProto, folder: Path):
    """An ONNX Runtime CPU session on `model`, its external data (if any) read from `folder` (the graph folder it
    was loaded from without its external data; only the initializers the proto still names are read). ONNX Runtime
    reads external data only from the model's own folder: the proto is written into a temporary folder beside
    `folder` that hard-links the data files (no copy), removed once the session holds its weights."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    # as written: no folded float32 copies of the BF16 weights, no pre-packed second copies (memory stays lean)
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    locations = {e.value for t in model.graph.initializer if t.data_location == TensorProto.EXTERNAL
                 for e in t.external_data if e.key == "location"}
    if not locations:
        return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    folder = Path(folder)
    with tempfile.TemporaryDirectory(prefix=".graph-eval-", dir=folder.parent) as tmp:
        for loc in locations:
            os.link(folder / loc, Path(tmp) / loc)
        onnx.save_model(model, str(Path(tmp) / "model.onnx"))
        return ort.InferenceSession(str(Path(tmp) / "model.onnx"), opts, providers=["CPUExecutionProvider"])
