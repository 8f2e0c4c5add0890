"""NVFP4 (W4A4, Blackwell targets): the E2M1 arithmetic against ml_dtypes; the graph's weight codes and scales
against numpy / ml_dtypes; the graph's weight and activation dequantization chains against the Torch emulation
(onnx's reference evaluator runs the standard operators; TensorRT's dynamic FP4 quantization is given an
implementation written with ml_dtypes, tests/graph_ref.py); each quantized layer of the whole graph (a float32
copy of the BF16 graph with its BF16 roundings kept, run by the reference evaluator) against the Torch backend,
with a backend without activation quantization and one without any shown to be caught; the end-to-end image
against the float32 graphs; TensorRT-RTX SM120 engines. ONNX Runtime has no FP4 kernels: it cannot run these
graphs.

Why no end-to-end bound for the activation quantization: on the tiny model the end-to-end image hardly depends on
it. Against the float32 graphs, the W4A4 Torch backend measures 31.7 / 33.2 / 34.6 dB on three prompts, the same
backend without activation quantization 32.4 / 34.2 / 35.5 dB (2026-11-26), and FP4 rounding flips make any two
correct W4A4 computations differ as much. Per layer, fed the graph's own activations, the emulation equals the
graph bit for bit, while the backend without activation quantization misses by 73-85 % of the quantization
effect.
"""

import json
from pathlib import Path

import ml_dtypes
import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from onnx.reference import ReferenceEvaluator

import quant_ref as qr
from conftest import in_ci, need
from graph_ref import TRT_FP4DynamicQuantize, float32_copy, initializer, linear_io, with_outputs
from zimage_deploy import build
from zimage_deploy.errors import UserError
from zimage_deploy.numerics import e2m1_codes, fake_nvfp4, nvfp4_blocks, nvfp4_global_scale, to_e2m1
from zimage_deploy.export.specs import CHECK_DIMS, specs_for
from zimage_deploy.scales import layers_of, load_scales
from zimage_deploy.models.emulate import _weight
from zimage_deploy.quantize.gate import psnr, unquantized_manifest
from zimage_deploy.runtime.backends import TorchBackend
from zimage_deploy.runtime.pipeline import Pipeline

CASES = [("A red fox in the snow at dawn", 256, 256),
         ("一只橘猫趴在窗台上晒太阳，窗外是开满樱花的街道", 192, 320)]
PSNR_MIN = 30.0  # quality floor, W4A4 on a random tiny model (measured 31.7-33.2 dB on these two prompts)
# per layer, emulation vs graph on the graph's activations, relative to the layer's quantization effect: measured
# 0 (bit for bit); without activation quantization 0.73-0.85, without any quantization 1.0
LAYER_BOUND = 1e-3
# whole transformer, relative to its quantization effect: FP4 rounding flips spread from BF16 roundings the graph
# and PyTorch place differently (measured 0.57-0.61); without any quantization 1.0
COMPONENT_BOUND = 0.8


@pytest.fixture(scope="module")
def nvfp4_build(tmp_path_factory, tiny_ckpt):
    out = Path(tmp_path_factory.mktemp("build-nvfp4"))
    if _trt() is None and in_ci():
        pytest.fail("tensorrt_rtx must be installed in CI (scripts/setup.sh installs every extra)", pytrace=False)
    flags = [] if _trt() else ["--skip-engines"]  # outside CI: the graphs are still checked
    assert build.main(["--model", str(tiny_ckpt), "--target", "rtx5090", "--precision", "nvfp4",
                       "--text-encoder-precision", "bf16", "--calib-size", "8", "--skip-parity",
                       "--out", str(out), *flags]) == 0
    return out, json.loads((out / "manifest.json").read_text())


def _trt():
    try:
        import tensorrt_rtx
        return tensorrt_rtx
    except ImportError:
        return None


def test_e2m1_rounding_matches_ml_dtypes():
    g = torch.Generator().manual_seed(0)
    ties = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 6.5, 100.0, 0.0])
    x = torch.cat([torch.randn(20000, generator=g) * 3, ties, -ties])
    ref = x.numpy().astype(ml_dtypes.float4_e2m1fn)
    assert torch.equal(to_e2m1(x), torch.from_numpy(ref.astype(np.float32)))
    assert torch.equal(e2m1_codes(to_e2m1(x)), torch.from_numpy(ref.view(np.uint8) & 0x0F))


def test_nvfp4_block_arithmetic():
    """numerics.py's NVFP4 blocks against the independent reference (tests/quant_ref.py, numpy / ml_dtypes): the
    global scale, each block's FP8 scale and FP4 values equal the reference's, and the dequantized tensor is
    values x FP8 scale x global scale (that scale rounded to the dtype, as the graph's Cast does); blocks of very
    different ranges, an all-zero block and values on FP4 ties included. The error is what 4 bits give."""
    g = torch.Generator().manual_seed(1)
    w = torch.randn(32, 64, generator=g) * torch.logspace(-2, 1, 64)  # blocks of very different ranges
    w[3, 16:32] = 0.0
    w[5, :16] = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 6.0] * 2)  # near FP4 midpoints
    amax = w.abs().amax()
    gs = nvfp4_global_scale(amax)
    values, s8_ref, g_ref = qr.nvfp4_weight(w.numpy(), amax.numpy())
    assert gs.numpy() == g_ref
    eff = s8_ref.astype(np.float32) * g_ref
    for dtype, rounded in ((torch.float32, np.float32), (torch.bfloat16, ml_dtypes.bfloat16)):
        q, s8, deq = nvfp4_blocks(w, gs, dtype)
        assert s8.dtype == torch.float8_e4m3fn and s8.shape == (32, 4) and deq.dtype == dtype
        np.testing.assert_array_equal(s8.view(torch.uint8).numpy(), s8_ref.view(np.uint8))
        np.testing.assert_array_equal(q.numpy(), values.astype(np.float32))
        ref = (values.astype(np.float32).reshape(32, 4, 16) * eff.astype(rounded).astype(np.float32)[..., None])
        np.testing.assert_array_equal(deq.float().numpy(), ref.reshape(32, 64).astype(rounded).astype(np.float32))
    assert s8.float().max() == 448.0  # the global scale puts the largest block scale at E4M3's top
    err = ((deq.float() - w).norm(dim=1) / w.norm(dim=1).clamp(min=1e-12)).max()
    assert 0.01 < err < 0.2


def _weight_chain(model: onnx.ModelProto, folder: Path, weight: str) -> np.ndarray:
    """Evaluate the graph's nodes that produce initializer-free `weight` (its dequantization chain)."""
    nodes, need, inits = [], {weight}, {t.name: t for t in model.graph.initializer}
    for n in reversed(list(model.graph.node)):
        if set(n.output) & need:
            nodes.insert(0, n)
            need |= set(n.input)
    used = [inits[i] for i in need if i in inits]
    for t in used:
        if t.data_location == TensorProto.EXTERNAL:
            onnx.external_data_helper.load_external_data_for_tensor(t, str(folder))
    graph = helper.make_graph(nodes, "w", [], [helper.make_tensor_value_info(weight, TensorProto.UNDEFINED, None)],
                              used)
    sub = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 23)])
    return np.asarray(ReferenceEvaluator(sub).run(None, {})[0]).astype(np.float32)


def test_graph_weights_equal_the_emulation(nvfp4_build):
    """Each NVFP4 weight, dequantized by the graph's own nodes (onnx reference evaluator), equals the Torch
    emulation's weight; the unquantized graph gives the original."""
    out, manifest = nvfp4_build
    comp = manifest["components"]["transformer"]
    q = comp["quantization"]
    assert comp["precision"] == "nvfp4" and q["scheme"] == "nvfp4" and q["block"] == 16
    assert q["calibration"]["count"] == 8
    src = onnx.load(str(out / comp["unquantized"]["onnx"]))
    qpath = out / comp["onnx"]
    model = onnx.load(str(qpath), load_external_data=False)
    assert {(o.domain, o.version) for o in model.opset_import} >= {("", 23), ("trt", 1)}
    dyn = [n for n in model.graph.node if n.op_type == "TRT_FP4DynamicQuantize"]
    assert all(n.domain == "trt" for n in dyn)
    inits = {t.name: t for t in model.graph.initializer}
    originals = {t.name: torch.from_numpy(numpy_helper.to_array(t).astype(np.float32)) for t in src.graph.initializer}
    scales, _ = load_scales(out / q["scales"])
    names = layers_of(scales)
    assert set(names) == qr.expected_layers(Path(manifest["model"]["path"]), "transformer", "nvfp4", src, 16)
    for name in names:
        assert inits[f"{name}.weight_q"].data_type == TensorProto.FLOAT4E2M1
        assert inits[f"{name}.weight_scale"].data_type == TensorProto.FLOAT8E4M3FN
        assert f"{name}.weight" not in inits
        graph_w = _weight_chain(model, qpath.parent, f"{name}.weight")
        w = originals[f"{name}.weight"].to(torch.bfloat16)
        emulated = _weight(w, "nvfp4", scales[f"{name}.weight_amax"], None, 16).float().numpy()
        np.testing.assert_array_equal(graph_w, emulated)
        assert 0.02 < np.linalg.norm(graph_w - w.float().numpy()) / np.linalg.norm(w.float().numpy()) < 0.2
        # one dynamic FP4 quantization on the activation of this layer's MatMul
        x, _ = linear_io(model, name)
        assert [n.op_type for n in model.graph.node if x in n.input] == ["TRT_FP4DynamicQuantize"]
    assert len(dyn) == len(names)


def test_weight_codes_match_an_independent_implementation(nvfp4_build):
    """Each NVFP4 weight's FP4 values, FP8 block scales and global scale in the graph (onnx's numpy_helper
    unpacks them) equal numpy / ml_dtypes quantization of the unquantized BF16 weight; the scale file's range is
    the weight's own."""
    out, manifest = nvfp4_build
    comp = manifest["components"]["transformer"]
    scales = {k: v.numpy() for k, v in load_scales(out / comp["quantization"]["scales"])[0].items()}
    src = onnx.load(str(out / comp["unquantized"]["onnx"]))
    model = onnx.load(str(out / comp["onnx"]))
    for name in layers_of(scales):
        w = initializer(src, f"{name}.weight").astype(np.float32)
        amax = scales[f"{name}.weight_amax"]
        assert amax == np.abs(w).max()
        values, s8, g = qr.nvfp4_weight(w, amax)
        assert initializer(model, f"{name}.weight_global") == g
        assert np.array_equal(initializer(model, f"{name}.weight_scale").view(np.uint8), s8.view(np.uint8))
        assert np.array_equal(initializer(model, f"{name}.weight_q").astype(np.float32), values.astype(np.float32))


def test_graph_activations_equal_the_emulation(nvfp4_build):
    """One layer's activation chain from the graph (TensorRT's dynamic quantization, scale DequantizeLinear, Cast,
    blocked DequantizeLinear) against the emulation's `fake_nvfp4`, on BF16 activations of several ranges."""
    out, manifest = nvfp4_build
    comp = manifest["components"]["transformer"]
    model = onnx.load(str(out / comp["onnx"]), load_external_data=False)
    dyn = next(n for n in model.graph.node if n.op_type == "TRT_FP4DynamicQuantize")
    chain, need = [dyn], set(dyn.output)
    for n in model.graph.node:
        if n.op_type in ("DequantizeLinear", "Cast") and set(n.input) & need:
            chain.append(n)
            need |= set(n.output)
    assert [n.op_type for n in chain] == ["TRT_FP4DynamicQuantize", "DequantizeLinear", "Cast", "DequantizeLinear"]
    g_init = next(t for t in model.graph.initializer if t.name == dyn.input[1])
    x_name, y_name = dyn.input[0], chain[-1].output[0]
    graph = helper.make_graph(chain, "a", [helper.make_tensor_value_info(x_name, TensorProto.BFLOAT16, None)],
                              [helper.make_tensor_value_info(y_name, TensorProto.BFLOAT16, None)], [g_init])
    sub = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 23), helper.make_opsetid("trt", 1)])
    ref = ReferenceEvaluator(sub, new_ops=[TRT_FP4DynamicQuantize])
    gs = torch.tensor(float(numpy_helper.to_array(g_init)))
    gen = torch.Generator().manual_seed(2)
    k = 64
    for spread in (0.1, 1.0, 30.0):
        x = (torch.randn(2, 40, k, generator=gen) * spread).to(torch.bfloat16)
        x[0, 0, :16] = 0  # an all-zero block
        got = np.asarray(ref.run(None, {x_name: x.float().numpy().astype(ml_dtypes.bfloat16)})[0]).astype(np.float32)
        np.testing.assert_array_equal(got, fake_nvfp4(x, gs).float().numpy())


@pytest.fixture(scope="module")
def graph_run(nvfp4_build):
    """The NVFP4 transformer graph evaluated on sample inputs (float32 copy with BF16 roundings, onnx's reference
    evaluator), every quantized layer's activation and output read out; and the unquantized graph's output."""
    out, manifest = nvfp4_build
    comp = manifest["components"]["transformer"]
    layers = layers_of(load_scales(out / comp["quantization"]["scales"])[0])
    model = onnx.load(str(out / comp["onnx"]))
    io = {layer: linear_io(model, layer) for layer in layers}
    spec = specs_for("turbo")["transformer"]
    sample = spec.sample(manifest["model"]["facts"], dict(CHECK_DIMS, latent_h=32, latent_w=32, cap_len=64),
                         torch.bfloat16)
    feeds = {i.name: (x.float() if x.is_floating_point() else x).numpy() for i, x in zip(spec.inputs, sample)}
    copy = with_outputs(float32_copy(model), [v for pair in io.values() for v in pair])
    values = dict(zip([o.name for o in copy.graph.output],
                      ReferenceEvaluator(copy, new_ops=[TRT_FP4DynamicQuantize]).run(None, feeds)))
    unquantized = onnx.load(str(out / comp["unquantized"]["onnx"]))
    ref = ort.InferenceSession(float32_copy(unquantized).SerializeToString(),
                               providers=["CPUExecutionProvider"]).run(None, feeds)[0]
    weights = {layer: initializer(unquantized, layer + ".weight").astype(np.float32) for layer in layers}
    return sample, {k: (values[x], values[y]) for k, (x, y) in io.items()}, values["noise_pred"], ref, weights


@pytest.mark.parametrize("candidate", ["emulation", "no activation quantization", "no fake quantization"])
def test_torch_backend_emulates_the_graph(nvfp4_build, graph_run, candidate):
    """The Torch backend's NVFP4 transformer against the graph: each quantized layer fed the graph's activation
    gives the graph's output (relative to the layer's quantization effect), and the whole transformer its output
    up to FP4 rounding flips. The broken candidates (the same backend with the activation pre-hooks removed, or
    without fake quantization) go through the same bounds and are caught."""
    out, manifest = nvfp4_build
    sample, layer_values, graph, unquantized, weights = graph_run
    backend = TorchBackend(out, unquantized_manifest(manifest) if candidate == "no fake quantization" else manifest,
                           device="cpu")
    dit = backend.model("transformer")
    modules = dict(backend.models["transformer"].named_modules())
    if candidate == "no activation quantization":
        for m in modules.values():
            m._forward_pre_hooks.clear()
    layer_err = 0.0
    for name, (x, y) in layer_values.items():
        with torch.no_grad():
            got = modules[name](torch.from_numpy(x).to(torch.bfloat16)).float().numpy()
        layer_err = max(layer_err, float(np.linalg.norm(got - y) / np.linalg.norm(y - x @ weights[name].T)))
    with torch.no_grad():
        got = dit(*sample).float().numpy()
    component_err = float(np.linalg.norm(got - graph) / np.linalg.norm(graph - unquantized))
    print(candidate, f"per layer {layer_err:.1e}, whole transformer {component_err:.2f} of the quantization effect")
    if candidate == "emulation":
        assert layer_err <= LAYER_BOUND and component_err <= COMPONENT_BOUND
    else:
        assert layer_err > 100 * LAYER_BOUND
        if candidate == "no fake quantization":
            assert component_err > COMPONENT_BOUND + 0.15


def test_end_to_end_psnr_against_float32(nvfp4_build, tiny_fp32):
    """The Torch backend runs the NVFP4 build (emulated from its scale file, what the gate measures); same seeds as
    the float32 graphs on ONNX Runtime."""
    out, manifest = nvfp4_build
    assert manifest["stages"]["quantize"]["quality_gate"]["method"].startswith("torch")
    got_pipe, ref_pipe = Pipeline(out, backend="torch"), Pipeline(tiny_fp32, backend="onnxruntime")
    values = []
    for i, (p, h, w) in enumerate(CASES):
        a = np.asarray(got_pipe(p, height=h, width=w, seed=i, progress=False)[0])
        b = np.asarray(ref_pipe(p, height=h, width=w, seed=i, progress=False)[0])
        values.append(psnr(a, b))
    print("nvfp4 vs float32", ["%.2f" % v for v in values])
    assert all(np.isfinite(v) for v in values) and min(values) >= PSNR_MIN


def test_tensorrt_rtx_sm120_engines(nvfp4_build):
    """The NVFP4 graph builds as a TensorRT-RTX SM120 (RTX 5090) engine on this GPU-less machine; the parsed network
    has FP4 weights and one dynamic quantization per layer. (Whether TensorRT fuses them into FP4 GEMMs shows only
    on a Blackwell GPU.)"""
    trt = need("tensorrt_rtx")
    out, manifest = nvfp4_build
    comp = manifest["components"]["transformer"]
    assert comp["engine"]["status"] == "complete" and (out / comp["engine"]["plan"]).stat().st_size > 0
    assert comp["engine"]["compute_capability"] == [12, 0]
    logger = trt.Logger(trt.Logger.ERROR)
    network = trt.Builder(logger).create_network(0)
    assert trt.OnnxParser(network, logger).parse_from_file(str(out / comp["onnx"]))
    layers = [network.get_layer(i) for i in range(network.num_layers)]
    fp4 = [la for la in layers if la.type == trt.LayerType.CONSTANT and la.get_output(0).dtype == trt.DataType.FP4]
    dynamic = [la for la in layers if la.type == trt.LayerType.DYNAMIC_QUANTIZE]
    src = onnx.load(str(out / comp["unquantized"]["onnx"]), load_external_data=False)
    expected = qr.expected_layers(Path(manifest["model"]["path"]), "transformer", "nvfp4", src, 16)
    assert len(fp4) == len(dynamic) == len(expected)


def test_nvfp4_only_for_blackwell(tmp_path, tiny_ckpt):
    with pytest.raises(UserError, match="not supported on target 'rtx4090'"):
        build.main(["--model", str(tiny_ckpt), "--target", "rtx4090", "--precision", "nvfp4",
                    "--out", str(tmp_path / "b")])
    assert not (tmp_path / "b").exists()
