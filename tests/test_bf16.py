"""BF16 builds: the graphs' dtypes (matmuls in BF16, norms / softmax / RoPE in float32), and their numbers.

ONNX Runtime has no BF16 CPU kernels, so each BF16 graph is computed as a float32 copy that keeps every BF16
rounding of the graph (tests/graph_ref.py: a Cast to BF16 and back after each node whose output is BF16) and
compared with the float32 graph of the same checkpoint (itself checked against diffusers / transformers to 1e-5 in
test_onnx_graphs.py). Its error must be the size of the Torch BF16 module's error against the same float32
reference: measured (2026-11-26) 0.84-1.18 times it over all nine turbo and edit graphs, at 0.5-1.2 % relative
L2. Two broken graphs go through the same bounds: a float32 graph passed off as BF16 (no BF16 rounding at all:
1e-4 of the Torch BF16 error) and a DiT graph without its float32 islands (RoPE, timestep embedding, norms and
softmax in BF16: 9-36 times). Tighter is not possible: ONNX's BF16 semantics round after every node (SiLU is
Sigmoid then Mul, a linear layer's MatMul then bias Add) where PyTorch's fused BF16 kernels round once, so the BF16
graph and the Torch BF16 module differ from each other as much as each differs from float32.

End to end, stated metric: 8-bit image PSNR of BF16 (torch backend) against the float32 build (ONNX Runtime),
same prompt and seed, >= 40 dB."""

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from graph_ref import BF16, FLOAT, float32_copy
from zimage_deploy.errors import UserError
from zimage_deploy.export.specs import CHECK_DIMS, specs_for
from zimage_deploy.runtime.backends import TorchBackend
from zimage_deploy.runtime.pipeline import Pipeline

MUST_BE_FLOAT32 = {"Softmax", "ReduceMean", "Pow", "Sqrt", "Cos", "Sin", "InstanceNormalization", "LayerNormalization"}
# the BF16 graph's relative L2 error against float32, as a multiple of the Torch BF16 module's
RATIO = (0.5, 1.5)
MAX_ERROR = 2.5e-2  # and at most this (measured <= 1.25e-2)


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


def _run(model: onnx.ModelProto, feeds: dict) -> list[np.ndarray]:
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)


def _errors(bf16_dir, fp32_dir, variant, name, graph: onnx.ModelProto) -> tuple[float, float]:
    """Relative L2 error of `graph` (a float32 model) and of the Torch BF16 module against the float32 graph, on
    the build's check shapes and on a larger batch of two."""
    manifest = json.loads((bf16_dir / "manifest.json").read_text())
    spec = specs_for(variant)[name]
    reference = onnx.load(str(fp32_dir / "onnx" / name / "model.onnx"))
    module = TorchBackend(bf16_dir, manifest, device="cpu").model(name)
    worst = [0.0, 0.0]
    for dims in (CHECK_DIMS, dict(CHECK_DIMS, batch=2, latent_h=32, latent_w=24, cap_len=64, text_len=40)):
        sample = spec.sample(manifest["model"]["facts"], dims, torch.bfloat16)
        feeds = {io.name: (s.float() if s.is_floating_point() else s).numpy() for io, s in zip(spec.inputs, sample)}
        with torch.no_grad():
            torch_out = module(*sample)
        torch_out = [t.float().numpy() for t in (torch_out if isinstance(torch_out, tuple) else (torch_out,))]
        keep = sample[1].bool().numpy() if name == "text_encoder" else slice(None)  # real tokens only
        flat = lambda outs: np.concatenate([o[keep].ravel() for o in outs]).astype(np.float64)  # noqa: E731
        ref = flat(_run(reference, feeds))
        assert np.linalg.norm(ref) > 1e-3 * ref.size ** 0.5  # outputs of a real magnitude
        for i, got in enumerate((_run(graph, feeds), torch_out)):
            worst[i] = max(worst[i], float(np.linalg.norm(flat(got) - ref) / np.linalg.norm(ref)))
    return worst[0], worst[1]


def _builds(request, variant):
    prefix = "tiny_" if variant == "turbo" else "edit_"
    return request.getfixturevalue(prefix + "bf16"), request.getfixturevalue(prefix + "fp32")


@pytest.mark.parametrize("variant,name", GRAPHS)
def test_bf16_graph_computes_the_model(request, variant, name):
    """The BF16 graph, computed with its BF16 roundings, against the float32 graph: a BF16-sized error, the size
    of the Torch BF16 module's."""
    bf16_dir, fp32_dir = _builds(request, variant)
    graph = float32_copy(onnx.load(str(bf16_dir / "onnx" / name / "model.onnx")))
    err, torch_err = _errors(bf16_dir, fp32_dir, variant, name, graph)
    print(f"{variant} {name}: BF16 graph {err:.2e}, torch BF16 module {torch_err:.2e} (ratio {err / torch_err:.2f})")
    assert RATIO[0] * torch_err <= err <= RATIO[1] * torch_err and err <= MAX_ERROR


@pytest.mark.parametrize("broken", ["float32 graph", "turbo DiT without float32 islands",
                                    "edit DiT without float32 islands"])
def test_broken_bf16_graphs_are_caught(request, broken):
    """The broken graphs through the bounds of test_bf16_graph_computes_the_model: both fail."""
    variant = "edit" if broken.startswith("edit") else "turbo"
    bf16_dir, fp32_dir = _builds(request, variant)
    if broken == "float32 graph":
        name, graph = "text_encoder", onnx.load(str(fp32_dir / "onnx" / "text_encoder" / "model.onnx"))
    else:  # every float32 value rounded to BF16 too
        name = "transformer"
        graph = float32_copy(onnx.load(str(bf16_dir / "onnx" / name / "model.onnx")), round_types=(BF16, FLOAT))
    err, torch_err = _errors(bf16_dir, fp32_dir, variant, name, graph)
    print(f"{broken}: {err:.2e}, torch BF16 module {torch_err:.2e} (ratio {err / torch_err:.2f})")
    assert not RATIO[0] * torch_err <= err <= RATIO[1] * torch_err


@pytest.mark.parametrize("prompt,h,w,seed", [("a cat on a red sofa", 128, 128, 0), ("雪山下的湖泊，清晨", 96, 160, 1)])
def test_bf16_torch_backend_close_to_fp32(tiny_bf16, tiny_fp32, prompt, h, w, seed):
    pipe = Pipeline(tiny_bf16, "torch")
    bf16 = np.asarray(pipe(prompt, h, w, seed=seed, progress=False)[0], dtype=float)
    fp32 = np.asarray(Pipeline(tiny_fp32, "onnxruntime")(prompt, h, w, seed=seed, progress=False)[0],
                      dtype=float)
    psnr = 10 * np.log10(255.0**2 / ((bf16 - fp32) ** 2).mean())
    print(f"bf16 vs fp32 PSNR {psnr:.1f} dB")
    assert {p.dtype for p in pipe.backend.model("transformer").parameters()} >= {torch.bfloat16}
    assert np.isfinite(psnr) and psnr >= 40.0  # BF16 changed the image, by little


def test_onnxruntime_refuses_bf16_graphs(tiny_bf16):
    with pytest.raises(UserError, match="BF16"):
        Pipeline(tiny_bf16, "onnxruntime")
