"""Weight-only quantization of exported graphs, one weight at a time (memory stays at about one tensor):
INT4 (symmetric, blocks of 128 along the input dimension, round to nearest) or FP8 E4M3 (per-tensor scale).

Each quantized weight `W` becomes an initializer `W_q` (int4 / float8) plus `W_scale`, and a standard-domain
`DequantizeLinear` node that outputs a tensor named `W`: the rest of the graph is unchanged, ONNX Runtime runs
it on the CPU and TensorRT fuses the dequantization into its matmuls. Precision-sensitive weights stay as they
are: timestep embedder, adaLN modulations, caption / image / SigLIP embedders, final layer, norms, token
embeddings, pad tokens (FP8 without these exclusions turns Z-Image into noise upstream).

    python -m zimage_deploy.quantize.weight_only SRC_COMPONENT_DIR DST_COMPONENT_DIR --scheme int4
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

EXCLUDE = ("adaLN_modulation", "t_embedder", "x_embedder", "cap_linear", "siglip_linear", "final_layer",
           "embed_tokens", "norm", "pad_token")
SCHEMES = ("int4", "fp8")
E4M3_MAX = 448.0


def quantizable(t: TensorProto, exclude=EXCLUDE) -> bool:
    return (len(t.dims) == 2 and t.name.endswith(".weight") and not any(e in t.name for e in exclude)
            and t.data_type in (TensorProto.FLOAT, TensorProto.BFLOAT16))


def pack_int4(q: torch.Tensor) -> bytes:
    """int values in [-8, 7] -> ONNX INT4 bytes (two per byte, the first in the low nibble)."""
    flat = (q.flatten().to(torch.int16) & 0x0F).to(torch.uint8)
    if flat.numel() % 2:
        flat = torch.cat([flat, flat.new_zeros(1)])
    return (flat[0::2] | (flat[1::2] << 4)).numpy().tobytes()


def int4_blocks(w: torch.Tensor, block: int) -> tuple[bytes, torch.Tensor]:
    out_f, in_f = w.shape
    blocks = w.float().reshape(out_f, in_f // block, block)
    scale = (blocks.abs().amax(-1) / 7.0).clamp(min=1e-12)
    q = torch.round(blocks / scale[..., None]).clamp(-8, 7).reshape(out_f, in_f)
    return pack_int4(q), scale


def fp8_tensor(w: torch.Tensor) -> tuple[bytes, torch.Tensor]:
    scale = (w.float().abs().amax() / E4M3_MAX).clamp(min=1e-12)
    q = (w.float() / scale).to(torch.float8_e4m3fn)
    return q.view(torch.uint8).numpy().tobytes(), scale.reshape(())


def _scale_raw(scale: torch.Tensor, elem: int) -> bytes:
    s = scale.to(TORCH_OF[elem]).contiguous()
    return (s.view(torch.int16) if s.dtype == torch.bfloat16 else s).numpy().tobytes()


def quantize_component(src: Path, dst: Path, scheme: str, block: int = 128, exclude=EXCLUDE) -> dict:
    """Quantize the weights of the graph in folder `src` (model.onnx [+ data]) into folder `dst`."""
    if scheme not in SCHEMES:
        raise UserError(f"unknown scheme {scheme!r}; choose one of {SCHEMES}")
    model = onnx.load(str(src / "model.onnx"), load_external_data=False)
    inits = list(model.graph.initializer)
    total = sum(int(np.prod(t.dims)) for t in inits)
    summary = {"scheme": scheme, "block": block if scheme == "int4" else None, "quantized": [], "kept": [],
               "bytes_before": 0, "bytes_after": 0}
    dq_nodes = []
    with atomic_dir(dst) as tmp:
        writer = ExternalWriter(tmp, external=(src / DATA_FILE).exists() or total > EXTERNAL_THRESHOLD)
        new_inits = []
        for t in tqdm(inits, desc=f"{scheme} weights", unit="tensor", leave=False):
            raw, w = read_initializer(t, src)
            summary["bytes_before"] += len(raw)
            ok = quantizable(t, exclude) and (scheme == "fp8" or t.dims[1] % block == 0)
            if not ok:
                new_inits.append(writer.add(t.name, t.data_type, list(t.dims), raw))
                summary["kept"].append(t.name)
                continue
            if scheme == "int4":
                qraw, scale = int4_blocks(w, block)
                qtype = TensorProto.INT4
            else:
                qraw, scale = fp8_tensor(w)
                qtype = TensorProto.FLOAT8E4M3FN
            sraw = _scale_raw(scale, t.data_type)
            new_inits.append(writer.add(t.name + "_q", qtype, list(t.dims), qraw))
            new_inits.append(writer.add(t.name + "_scale", t.data_type, list(scale.shape), sraw))
            attrs = {"axis": 1, "block_size": block} if scheme == "int4" else {}
            dq_nodes.append(helper.make_node("DequantizeLinear", [t.name + "_q", t.name + "_scale"], [t.name],
                                             name=f"/dequantize/{t.name}", **attrs))
            summary["quantized"].append(t.name)
        writer.close()
        if not summary["quantized"]:  # inside the atomic folder: nothing is left behind
            raise UserError(f"no weight of {src} could be quantized with {scheme} (block {block})")
        summary["bytes_after"] = writer.bytes_written
        del model.graph.initializer[:]
        model.graph.initializer.extend(new_inits)
        nodes = list(model.graph.node)
        del model.graph.node[:]
        model.graph.node.extend(dq_nodes + nodes)
        for op in model.opset_import:  # INT4 blocked DequantizeLinear needs opset 21
            if op.domain in ("", "ai.onnx") and op.version < 21:
                op.version = 21
        onnx.save_model(model, str(tmp / "model.onnx"))
        onnx.checker.check_model(str(tmp / "model.onnx"))
        onnx.shape_inference.infer_shapes_path(str(tmp / "model.onnx"), str(tmp / "model.onnx"))
    return summary


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m zimage_deploy.quantize.weight_only",
                                 description=__doc__.split("\n")[0])
    ap.add_argument("src", type=Path, help="a component folder of a build: onnx/<component>")
    ap.add_argument("dst", type=Path)
    ap.add_argument("--scheme", default="int4", choices=SCHEMES)
    ap.add_argument("--block", type=int, default=128)
    args = ap.parse_args(argv)
    if not (args.src / "model.onnx").is_file():
        raise UserError(f"{args.src} has no model.onnx")
    s = quantize_component(args.src, args.dst, args.scheme, args.block)
    print(f"{args.dst}: {len(s['quantized'])} weights {args.scheme}, {len(s['kept'])} kept; "
          f"{s['bytes_before'] / 2**30:.2f} GiB -> {s['bytes_after'] / 2**30:.2f} GiB")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
