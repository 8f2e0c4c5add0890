"""ONNX Runtime: LoRAs as a side branch in the graph, so a LoRA set is a feed, not a session per set.

The build's DiT graph (float or Q/DQ-quantized) is rewritten in memory, once per component, on the first LoRA
use: for every adaptable weight W (a tensor of that name feeds the layer's MatMul through the exporter's
Transpose, or a Gemm), with X the layer's activation and Y its output,

    Y' = Y + ((X @ down_t) * scale) @ up_t        down_t (in, r), up_t (r, out), scale (r,): graph inputs

and Y's consumers read Y'. On a quantized graph X is taken before the activation's QuantizeLinear (FP8) and before
the AWQ pre-quantization scale (INT4), so the branch runs in the graph's float dtype on the unquantized activation
beside the Q/DQ matmul, never re-quantized. TensorRT engines take the same rewrite with fixed ranks
(lora/tensorrt.py). The rank
r is a dynamic dimension: each set feeds its own (r = 0 for the layers it leaves alone: an exact zero is added).
The graph files are not changed (external data is read from the build's folder) and the base sessions are not
touched: generations without LoRAs run the build's graphs as they are. Sets are per call, so generations with
different sets run side by side on one session.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper

from ..errors import InternalError
from ..models.stream import Factor

SUFFIXES = (".lora_down_t", ".lora_up_t", ".lora_scale")


def _producers(graph) -> dict:
    return {o: n for n in graph.node for o in n.output}


def _consumers(graph) -> dict:
    out: dict[str, list] = {}
    for n in graph.node:
        for i in n.input:
            out.setdefault(i, []).append(n)
    return out


def _layer(weight: str, producers: dict, consumers: dict):
    """(activation X, output Y) of the linear layer whose weight tensor is `weight`, or None."""
    for node in consumers.get(weight, []):
        if node.op_type == "Transpose":
            node = next((m for m in consumers.get(node.output[0], []) if m.op_type == "MatMul"), None)
            if node is None:
                continue
        elif node.op_type == "Gemm":
            attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
            if attrs.get("transB", 0) != 1 or attrs.get("transA", 0) or attrs.get("alpha", 1.0) != 1.0:
                continue
        elif node.op_type != "MatMul":
            continue
        return _activation(node.input[0], producers), node.output[0]
    return None


def _activation(x: str, producers: dict) -> str:
    """The layer's unquantized activation: before an FP8 QuantizeLinear -> DequantizeLinear pair, and before an
    INT4 AWQ pre-quantization scale (quantize/qdq.py: the weight was divided by it, the branch's factors were not)."""
    dq = producers.get(x)
    if dq is not None and dq.op_type == "DequantizeLinear":
        q = producers.get(dq.input[0])
        if q is not None and q.op_type == "QuantizeLinear":
            x = q.input[0]
    awq = producers.get(x)
    if awq is not None and awq.op_type == "Mul" and awq.input[1].endswith(".pre_quant_scale"):
        x = awq.input[0]
    return x


def add_branches(model: onnx.ModelProto, shapes: dict[str, tuple[int, int]], elem=TensorProto.FLOAT,
                 ranks: dict[str, int] | None = None) -> list:
    """Rewrite `model` in place: a branch beside every layer whose weight is named in `shapes` (our weight name ->
    (out, in)); returns the weight names that got one. Nodes are appended in order after their inputs. `elem`: the
    factors' ONNX data type (one for all, or weight name -> type); `ranks`: a fixed rank per weight (TensorRT
    engines: lora/tensorrt.py) instead of a dynamic dimension."""
    graph = model.graph
    producers, consumers = _producers(graph), _consumers(graph)
    done = []
    for weight, (out, inp) in shapes.items():
        found = _layer(weight, producers, consumers)
        if found is None:
            continue
        x, y = found
        if any(o.name == y for o in graph.output):  # not the case for a DiT's linear layers
            continue
        base = weight[: -len(".weight")] if weight.endswith(".weight") else weight
        down, up, scale = (base + s for s in SUFFIXES)
        rank = f"{base}.lora_rank" if ranks is None else int(ranks[weight])
        kind = elem[weight] if isinstance(elem, dict) else elem
        graph.input.extend([helper.make_tensor_value_info(down, kind, [inp, rank]),
                            helper.make_tensor_value_info(up, kind, [rank, out]),
                            helper.make_tensor_value_info(scale, kind, [rank])])
        h, hs, z, y2 = (f"{base}/lora/{k}" for k in ("h", "hs", "z", "out"))
        for node in consumers.get(y, []):  # the layer's consumers read Y + branch
            for i, name in enumerate(node.input):
                if name == y:
                    node.input[i] = y2
        new = [helper.make_node("MatMul", [x, down], [h], name=f"/{base}/lora/MatMul"),
               helper.make_node("Mul", [h, scale], [hs], name=f"/{base}/lora/Mul"),
               helper.make_node("MatMul", [hs, up], [z], name=f"/{base}/lora/MatMul_1"),
               helper.make_node("Add", [y, z], [y2], name=f"/{base}/lora/Add")]
        position = max(i for i, n in enumerate(graph.node) if y in n.output) + 1
        for k, node in enumerate(new):
            graph.node.insert(position + k, node)
        done.append(weight)
    return done


def feeds(shapes: dict[str, tuple[int, int]], adapted: list[str], table: dict[str, list[Factor]],
          dtype=np.float32, ranks: dict[str, int] | None = None) -> dict[str, np.ndarray]:
    """The branch inputs for `table` (rank 0 for the layers it leaves alone; with `ranks`, every weight's fixed
    rank, the columns past the set's zero)."""
    out = {}
    for weight in adapted:
        rows, inp = shapes[weight]
        base = weight[: -len(".weight")]
        parts = table.get(weight, [])
        r = sum(d.shape[0] for _, d, _, _ in parts)
        if ranks is not None:
            if r > ranks[weight]:
                raise InternalError(f"{weight}: the set has rank {r}, the branch holds {ranks[weight]}")
            r = ranks[weight]
        down = np.zeros((inp, r), dtype)
        up = np.zeros((r, rows), dtype)
        scale = np.zeros((r,), dtype)
        col = 0
        for (a, b), d, u, s in parts:
            k = d.shape[0]
            down[:, col:col + k] = d.float().numpy().T
            up[col:col + k, a:b] = u.float().numpy().T
            scale[col:col + k] = s
            col += k
        out.update(zip((base + s for s in SUFFIXES), (down, up, scale)))
    return out


class OrtBranchSessions:
    """One session per DiT component, on the build's graph with branches; `run` takes a set's feeds."""

    def __init__(self, backend, shapes: dict[str, tuple[int, int]]):
        from ..buildfolder import BuildFolder

        ort = backend.ort
        self.shapes = shapes
        self.sessions, self.adapted = {}, {}
        from .targets import dit_components

        for name in dit_components(backend.manifest):
            path = BuildFolder(backend.engine_dir).file(backend.components[name]["onnx"])
            model = onnx.load(str(path), load_external_data=False)
            adapted = add_branches(model, shapes)
            if not adapted:
                continue
            opts = ort.SessionOptions()
            opts.log_severity_level = 3
            opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
            opts.add_session_config_entry("session.model_external_initializers_file_folder_path",
                                          str(Path(path).parent))
            self.sessions[name] = ort.InferenceSession(model.SerializeToString(), opts, providers=backend.providers)
            self.adapted[name] = adapted

    def prepare(self, table: dict[str, list[Factor]]) -> dict[str, dict[str, np.ndarray]]:
        return {name: feeds(self.shapes, adapted, table) for name, adapted in self.adapted.items()}

    def run(self, backend, component: str, inputs: dict, prepared: dict) -> dict[str, torch.Tensor]:
        """The ONNX Runtime backend's `run` on this component's branch session, with the set's feeds."""
        feeds_ = {k: v.detach().cpu().numpy() for k, v in backend._cast_inputs(component, inputs).items()}
        outputs = self.sessions[component].run(None, {**feeds_, **prepared[component]})
        names = [o["name"] for o in backend.components[component]["outputs"]]
        return {n: torch.from_numpy(np.asarray(o)) for n, o in zip(names, outputs)}
