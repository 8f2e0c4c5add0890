"""BF16 builds: ONNX Runtime has no BF16 CPU kernels, so the graphs are checked structurally here and their
math through the Torch backend in BF16 (the same modules the graphs were traced from).

Stated metric: end-to-end 8-bit image PSNR of BF16 (torch backend) against the float32 build (ONNX Runtime),
same prompt and seed, >= 40 dB; per-component rel. L2 against float32 <= 3e-2 (recorded at build time)."""

import json

import numpy as np
import onnx
import pytest

from zimage_deploy.errors import UserError
from zimage_deploy.runtime.pipeline import Pipeline

FLOAT, BF16 = onnx.TensorProto.FLOAT, onnx.TensorProto.BFLOAT16
MUST_BE_FLOAT32 = {"Softmax", "ReduceMean", "Pow", "Sqrt", "Cos", "Sin", "InstanceNormalization", "LayerNormalization"}


def elem_types(model):
    types = {v.name: v.type.tensor_type.elem_type
             for v in list(model.graph.value_info) + list(model.graph.input) + list(model.graph.output)}
    types.update({i.name: i.data_type for i in model.graph.initializer})
    return types


GRAPHS = [("turbo", n) for n in ("text_encoder", "context_refiner", "transformer", "vae_decoder", "vae_encoder")]
GRAPHS += [("edit", n) for n in ("context_refiner", "siglip_refiner", "transformer", "vision_encoder")]


@pytest.mark.parametrize("variant,name", GRAPHS)
def test_bf16_graph_dtypes(request, variant, name):
    build_dir = request.getfixturevalue("tiny_bf16" if variant == "turbo" else "edit_bf16")
    model = onnx.load(str(build_dir / "onnx" / name / "model.onnx"))
    types = elem_types(model)
    initializers = {i.name for i in model.graph.initializer}
    matmuls = 0
    for node in model.graph.node:
        first = types.get(node.input[0]) if node.input else None
        if node.op_type in ("MatMul", "Conv"):
            if first == FLOAT and name == "vision_encoder" and "/embeddings/" in node.name:
                continue  # SigLIP2 resizes its position table in float32 (interpolation weights @ table)
            assert first == BF16, f"{node.op_type} {node.name} runs in {first}"
            matmuls += 1
        elif node.op_type == "Gemm":
            weight = node.input[1]
            # only the timestep embedder runs its matmuls in float32
            assert first == (FLOAT if "t_embedder" in weight else BF16), f"Gemm {node.name} on {weight}"
        elif node.op_type in MUST_BE_FLOAT32:
            assert first == FLOAT, f"{node.op_type} {node.name} runs in {first}"
        elif node.op_type == "Gather" and node.input[0] in initializers and "embed_tokens" not in node.input[0]:
            assert first == FLOAT, f"RoPE table {node.input[0]} is not float32"
    assert matmuls > 0
    manifest = json.loads((build_dir / "manifest.json").read_text())["components"][name]
    assert manifest["compute_dtype"] == "bfloat16"
    assert manifest["parity"]["rel_l2"] <= 3e-2, manifest["parity"]


@pytest.mark.parametrize("prompt,h,w,seed", [("a cat on a red sofa", 128, 128, 0), ("雪山下的湖泊，清晨", 96, 160, 1)])
def test_bf16_torch_backend_close_to_fp32(tiny_bf16, tiny_fp32, prompt, h, w, seed):
    bf16 = np.asarray(Pipeline(tiny_bf16, "torch")(prompt, h, w, seed=seed, progress=False)[0], dtype=float)
    fp32 = np.asarray(Pipeline(tiny_fp32, "onnxruntime")(prompt, h, w, seed=seed, progress=False)[0],
                      dtype=float)
    psnr = 10 * np.log10(255.0**2 / ((bf16 - fp32) ** 2).mean())
    print(f"bf16 vs fp32 PSNR {psnr:.1f} dB")
    assert psnr >= 40.0


def test_onnxruntime_refuses_bf16_graphs(tiny_bf16):
    with pytest.raises(UserError, match="BF16"):
        Pipeline(tiny_bf16, "onnxruntime")
