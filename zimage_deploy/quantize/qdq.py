"""Quantized graphs: standard-domain Q/DQ (opset 21; 23 for NVFP4) written into an exported graph, one weight at a
time.

For each quantized linear layer NAME (weight initializer NAME.weight -> Transpose -> MatMul):
- the weight becomes NAME.weight_q (FLOAT8E4M3FN per tensor, or INT4 in blocks along the input dimension) plus
  NAME.weight_scale and a `DequantizeLinear` that outputs NAME.weight, so the rest of the graph is unchanged;
- FP8 (W8A8): the MatMul's activation goes through `QuantizeLinear` -> `DequantizeLinear` with the calibrated
  per-tensor scale (what TensorRT fuses into an FP8 GEMM; ONNX Runtime executes it on the CPU);
- INT4 AWQ: the activation is multiplied by the layer's pre-quantization scale and the weight divided by it
  before quantizing (W4A16: the MatMul itself runs in the graph's dtype).
- NVFP4 (W4A4, Blackwell): the weight becomes FLOAT4E2M1 in blocks of 16 with FLOAT8E4M3FN block scales, which a
  first `DequantizeLinear` scales by the per-tensor global scale; the activation goes through TensorRT's
  `trt::TRT_FP4DynamicQuantize` (block scales computed at run time, calibrated global scale) and the same
  two-level `DequantizeLinear`. TensorRT fuses both into an FP4 GEMM; ONNX Runtime has no kernel for either, so
  these graphs are checked through the Torch emulation and TensorRT's parser.
- FP8 attention (DiT, optional): Q/DQ on both attention BMMs' inputs (q, k; softmax output, v).
Scales come from a calibration file (calibrate.py). Without one, weights are quantized round-to-nearest from their
own range (INT4 RTN, or FP8 weight-only) and the precision-sensitive layers are skipped by name.

    python -m zimage_deploy.quantize.qdq SRC_COMPONENT_DIR DST_COMPONENT_DIR --scheme int4 [--scales FILE]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper
from tqdm import tqdm

from ..cli import run_cli
from ..errors import UserError
from ..export.weights import DATA_FILE, EXTERNAL_THRESHOLD, TORCH_OF, ExternalWriter, read_initializer
from ..fsutil import atomic_dir
from ..numerics import fp8_scale
from ..scales import PROBS_AMAX, attention_layers_of, layers_of, load_scales
from ..schemes import SCHEMES, get_scheme
from .options import DEFAULT_EXCLUDE

# names that are never matmul weights worth quantizing, whatever the exclusions say
ALWAYS_KEEP = ("norm", "embed_tokens", "pad_token")


def quantizable(t: TensorProto, exclude=DEFAULT_EXCLUDE) -> bool:
    return (len(t.dims) == 2 and t.name.endswith(".weight")
            and not any(e in t.name for e in tuple(exclude) + ALWAYS_KEEP)
            and t.data_type in (TensorProto.FLOAT, TensorProto.BFLOAT16))


def raw_of(t: torch.Tensor, elem: int) -> bytes:
    t = t.to(TORCH_OF[elem]).contiguous()
    return (t.view(torch.int16) if t.dtype == torch.bfloat16 else t).numpy().tobytes()


class _Out:
    """Where a scheme writes one graph's initializers (through the external-data writer) and nodes (`g`)."""

    def __init__(self, writer: ExternalWriter, g: "_Graph", zero_point: str):
        self.writer, self.g, self.zero_point, self.inits = writer, g, zero_point, []

    def add(self, name: str, data_type: int, dims: list[int], raw: bytes) -> None:
        self.inits.append(self.writer.add(name, data_type, dims, raw))

    def add_tensor(self, name: str, t: torch.Tensor, elem: int) -> None:
        self.add(name, elem, list(t.shape), raw_of(t, elem))

    @staticmethod
    def torch_dtype(elem: int) -> torch.dtype:
        return TORCH_OF[elem]


class _Graph:
    """Consumers of each value, and nodes to insert before a given node (keeps the node list topological)."""

    def __init__(self, graph: onnx.GraphProto):
        self.nodes = list(graph.node)
        self.consumers: dict[str, list[onnx.NodeProto]] = {}
        for n in self.nodes:
            for i in n.input:
                self.consumers.setdefault(i, []).append(n)
        self.first: list[onnx.NodeProto] = []
        self.before: dict[str, list[onnx.NodeProto]] = {}

    def matmul_of(self, weight: str) -> onnx.NodeProto | None:
        """The MatMul a linear weight feeds (directly or through the exporter's Transpose)."""
        for n in self.consumers.get(weight, []):
            if n.op_type == "MatMul" and n.input[1] == weight:
                return n
            if n.op_type == "Transpose":
                return next((m for m in self.consumers.get(n.output[0], []) if m.op_type == "MatMul"
                             and m.input[1] == n.output[0]), None)
        return None

    def insert_before(self, node: onnx.NodeProto, new: onnx.NodeProto) -> None:
        self.before.setdefault(node.name, []).append(new)

    def fp8_qdq(self, node: onnx.NodeProto, index: int, scale_name: str, zero_point: str) -> None:
        """Quantize-dequantize input `index` of `node` (FP8, per tensor, scale initializer `scale_name`)."""
        value, tag = node.input[index], f"{scale_name}.{node.name}"
        self.insert_before(node, helper.make_node("QuantizeLinear", [value, scale_name, zero_point], [tag + "_q"],
                                                  name=f"/quant{node.name}/{index}/QuantizeLinear"))
        self.insert_before(node, helper.make_node("DequantizeLinear", [tag + "_q", scale_name], [tag + "_dq"],
                                                  name=f"/quant{node.name}/{index}/DequantizeLinear"))
        node.input[index] = tag + "_dq"

    def attention_matmuls(self, module: str) -> tuple[onnx.NodeProto, onnx.NodeProto]:
        """The scores (q k^T) and output (probs v) MatMuls of attention module `module` (the exporter's scopes)."""
        parts: list[str] = []
        for seg in module.split("."):  # layers.0.attention -> /layers.0/attention/
            if seg.isdigit() and parts:
                parts[-1] += "." + seg
            else:
                parts.append(seg)
        scope = "/" + "/".join(parts) + "/"
        found = [next((n for n in self.nodes if n.op_type == "MatMul" and n.name.endswith(scope + suffix)), None)
                 for suffix in ("MatMul", "MatMul_1")]
        if None in found:
            raise UserError(f"no attention BMMs for {module} (scope {scope}) in the graph")
        return found[0], found[1]

    def ordered(self) -> list[onnx.NodeProto]:
        out = list(self.first)
        for n in self.nodes:
            out.extend(self.before.get(n.name, []))
            out.append(n)
        return out


def quantize_graph(src: Path, dst: Path, scheme: str, block: int = 128, scales: dict | None = None,
                   exclude=DEFAULT_EXCLUDE, progress: bool = True) -> dict:
    """Write the graph of folder `src` (model.onnx [+ data]) with `scheme` Q/DQ into folder `dst`. The summary's
    "scales" are the scales written (for a round-to-nearest run: the ones it computed), in calibrate.py's keys."""
    kind = get_scheme(scheme)
    src, dst = Path(src), Path(dst)
    model = onnx.load(str(src / "model.onnx"), load_external_data=False)
    inits = list(model.graph.initializer)
    g = _Graph(model.graph)
    layers = set(layers_of(scales)) if scales is not None else None
    total = sum(int(np.prod(t.dims)) for t in inits)
    if kind.needs_scales and scales is None:
        raise UserError(f"{scheme} needs calibrated activation scales (--scales): its activations are quantized too")
    summary = {"scheme": scheme, "block": kind.block(block), "quantized": [],
               "activation_qdq": 0, "awq_scaled": 0, "kept": [], "bytes_before": 0, "bytes_after": 0}
    used: dict[str, torch.Tensor] = {}  # the scales written, in the calibration file's keys
    with atomic_dir(dst) as tmp:
        writer = ExternalWriter(tmp, external=(src / DATA_FILE).exists() or total > EXTERNAL_THRESHOLD)
        out = _Out(writer, g, "/quant/fp8_zero_point")
        elem = None
        for t in tqdm(inits, desc=f"{scheme} Q/DQ {src.name}", unit="tensor", leave=False, disable=not progress):
            raw, w = read_initializer(t, src)
            summary["bytes_before"] += len(raw)
            name = t.name[: -len(".weight")] if t.name.endswith(".weight") else None
            if layers is not None:
                ok = name in layers
            else:
                ok = quantizable(t, exclude) and t.dims[1] % kind.layer_width(block) == 0
            matmul = g.matmul_of(t.name) if ok else None
            if matmul is None:
                if layers is not None and name in layers:
                    raise UserError(f"{src}: the calibrated layer {name} has no MatMul in the graph")
                out.add(t.name, t.data_type, list(t.dims), raw)
                if len(t.dims) == 2:
                    summary["kept"].append(t.name)
                continue
            elem = t.data_type  # the graph's dtype for this layer: the activation arrives in it too
            get = (lambda k: scales.get(f"{name}.{k}")) if scales is not None else (lambda k: None)
            pre = get("pre_quant_scale")
            w = w.float() if pre is None else w.float() / pre[None, :]
            used[f"{name}.weight_amax"] = kind.write_weight(out, t.name, w, get("weight_amax"), block, elem)
            act = matmul.input[0]
            if pre is not None:
                used[f"{name}.pre_quant_scale"] = pre
                out.add(f"{name}.pre_quant_scale", elem, [int(pre.numel())], raw_of(pre, elem))
                g.insert_before(matmul, helper.make_node("Mul", [act, f"{name}.pre_quant_scale"],
                                                         [f"{name}.input_awq"], name=f"/quant/{name}/AWQMul"))
                act = f"{name}.input_awq"
                summary["awq_scaled"] += 1
            matmul.input[0] = act
            in_amax = get("input_amax")
            if in_amax is None and kind.needs_scales:
                raise UserError(f"the scales of {name} have no input_amax: {scheme} needs calibrated activations")
            if in_amax is not None:
                used[f"{name}.input_amax"] = in_amax
                kind.write_activation(out, name, matmul, in_amax, elem)
                summary["activation_qdq"] += 1
            summary["quantized"].append(name)
        summary["attention_qdq"] = 0
        for attn in attention_layers_of(scales or {}):
            scores, output = g.attention_matmuls(attn)
            amax = {x: scales[f"{attn}.{x}_bmm_amax"] for x in "qkv"}
            amax["p"] = torch.tensor(PROBS_AMAX)
            for x, (node, index) in zip("qkpv", ((scores, 0), (scores, 1), (output, 0), (output, 1))):
                if x != "p":
                    used[f"{attn}.{x}_bmm_amax"] = amax[x]
                out.add(f"{attn}.{x}_bmm_scale", elem, [], raw_of(fp8_scale(amax[x]), elem))
                g.fp8_qdq(node, index, f"{attn}.{x}_bmm_scale", out.zero_point)
            summary["attention_qdq"] += 1
        if summary["activation_qdq"] or summary["attention_qdq"]:
            out.inits.append(helper.make_tensor(out.zero_point, TensorProto.FLOAT8E4M3FN, [], [0]))
        writer.close()
        if not summary["quantized"]:  # inside the atomic folder: nothing is left behind
            raise UserError(f"no weight of {src} could be quantized with {scheme} (block {block})")
        summary["bytes_after"] = writer.bytes_written
        del model.graph.initializer[:]
        model.graph.initializer.extend(out.inits)
        nodes = g.ordered()
        del model.graph.node[:]
        model.graph.node.extend(nodes)
        kind.finish_model(model)
        onnx.save_model(model, str(tmp / "model.onnx"))
        onnx.checker.check_model(str(tmp / "model.onnx"))
        onnx.shape_inference.infer_shapes_path(str(tmp / "model.onnx"), str(tmp / "model.onnx"))
    summary["scales"] = used
    return summary


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m zimage_deploy.quantize.qdq", description=__doc__.split("\n")[0])
    ap.add_argument("src", type=Path, help="a component folder of a build: onnx/<component>")
    ap.add_argument("dst", type=Path)
    ap.add_argument("--scheme", default="int4", choices=tuple(SCHEMES))
    ap.add_argument("--block", type=int, default=128, help="INT4 block size (input channels per scale)")
    ap.add_argument("--scales", type=Path, default=None,
                    help="calibration scales (quant/<component>.<scheme>.safetensors of a build); "
                         "without: round to nearest from the weights, weight-only")
    args = ap.parse_args(argv)
    if not (args.src / "model.onnx").is_file():
        raise UserError(f"{args.src} has no model.onnx")
    scales = None
    if args.scales:
        if not args.scales.is_file():
            raise UserError(f"scales file {args.scales} does not exist")
        scales, meta = load_scales(args.scales)
        if meta.get("scheme") not in (None, args.scheme):
            raise UserError(f"{args.scales} holds {meta['scheme']} scales, not {args.scheme}")
    s = quantize_graph(args.src, args.dst, args.scheme, args.block, scales)
    print(f"{args.dst}: {len(s['quantized'])} layers {args.scheme} ({s['activation_qdq']} with activation Q/DQ, "
          f"{s['awq_scaled']} AWQ-scaled), {len(s['kept'])} 2-D weights kept; "
          f"{s['bytes_before'] / 2**30:.2f} GiB -> {s['bytes_after'] / 2**30:.2f} GiB")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
