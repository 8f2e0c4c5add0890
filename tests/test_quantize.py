"""The quantize stage: calibrated FP8 (W8A8, optional FP8 attention) and INT4 (AWQ / RTN, W4A16) graphs of the
tiny model.

- The graphs' weight codes and scales, and every quantized layer's output, against an independent numpy /
  ml_dtypes implementation (tests/quant_ref.py), on the activations the graph itself computes; broken writers
  (INT4 truncating instead of rounding, FP8 without activation Q/DQ) are written once and shown to be caught.
- The Torch backend's emulation against the graphs, layer by layer and per component; a Torch backend without
  fake quantization and one without activation quantization are shown to be caught.
- End to end against the float32 graphs (quality floors), the quality gate's figures recomputed, the manifest
  record, errors, TensorRT-RTX engines of the quantized graphs.

Why per layer: FP8 activation quantization is chaotic. Two correct FP8 computations whose float32 sums differ in
the last bit (ONNX Runtime and PyTorch) round a few activations to neighbouring FP8 codes, and the difference
spreads: after 8 sampling steps the Torch emulation and the FP8 graphs differ by half the FP8-vs-float32
difference, as much as a Torch backend without activation quantization does (measured 0.50-0.63 vs 0.49-0.58),
so no end-to-end bound can tell them apart. Fed the same activations, one layer agrees bit for bit (FP8, RTN)
or to 1e-6 (AWQ), while the broken variants miss by 73 % (no activation quantization) and 100 % (none).
"""

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

import quant_ref as qr
from conftest import need
from graph_ref import initializer, linear_io, with_outputs
from zimage_deploy import build
from zimage_deploy.errors import UserError
from zimage_deploy.export.specs import CHECK_DIMS, specs_for
from zimage_deploy.components import LOADER_OF
from zimage_deploy.scales import layers_of, load_scales
from zimage_deploy.quantize.gate import GATE_PROMPTS, psnr, unquantized_manifest
from zimage_deploy.quantize.options import DEFAULT_EXCLUDE, SHIPPED_PROMPTS, load_prompts
from zimage_deploy.runtime.backends import OnnxRuntimeBackend, TorchBackend
from zimage_deploy.runtime.pipeline import Pipeline

CALIB = ["--calib-size", "8"]
# (prompt, height, width): aspect ratios, a Chinese prompt, a long prompt
CASES = [("A red fox in the snow at dawn", 256, 256),
         ("一只橘猫趴在窗台上晒太阳，窗外是开满樱花的街道", 192, 320),
         ("A detailed technical blueprint of a steam locomotive, white lines on blue paper, " * 4, 320, 160)]
FLAGS = {"fp8": ["--precision", "fp8"], "fp8-attention": ["--precision", "fp8", "--fp8-attention"],
         "fp8-text-encoder": ["--precision", "fp8", "--text-encoder-precision", "fp8"],
         "int4": ["--precision", "int4"], "int4-rtn": ["--precision", "int4", "--int4-method", "rtn"]}
# image PSNR against the float32 graphs, same seeds: quality floors (measured 43-45 dB FP8, 31-35 dB INT4)
PSNR_MIN = {"fp8": 40.0, "fp8-attention": 40.0, "fp8-text-encoder": 35.0, "int4": 30.0, "int4-rtn": 30.0}
QUANTIZED = {"fp8": ["transformer"], "fp8-attention": ["transformer"],
             "fp8-text-encoder": ["transformer", "text_encoder"], "int4": ["transformer", "text_encoder"],
             "int4-rtn": ["transformer", "text_encoder"]}
# sample inputs for the per-layer checks: 256 image tokens, 64 caption tokens, 40 text tokens
DIMS = dict(CHECK_DIMS, latent_h=32, latent_w=32, cap_len=64, text_len=40)

# graph layer vs independent reference, same activations: float32 summation order only (measured 0 to 1e-7)
REF_BOUND = 1e-5
# emulated layer vs graph layer, relative to the layer's quantization effect |graph - unquantized layer|
# (measured 0 for FP8 and RTN, 1e-6 for AWQ, whose graph multiplies the activation where the emulation
# multiplies the weight); without activation quantization 0.73, without any quantization 1.0
LAYER_BOUND = 1e-4
# whole component, relative to its quantization effect: FP8 rounding flips spread (measured <= 0.05 here);
# a backend without fake quantization measures 1.0
COMPONENT_BOUND = 0.25


def _build(tmp_path_factory, ckpt, flags, target="cpu", tag="q"):
    out = Path(tmp_path_factory.mktemp(f"build-{tag}"))
    args = ["--model", str(ckpt), "--target", target, "--out", str(out), "--skip-parity", *CALIB, *flags]
    assert build.main(args) == 0
    return out


@pytest.fixture(scope="session")
def quantized_build(tmp_path_factory, tiny_ckpt):
    """kind -> build folder, each built once per session."""
    built = {}

    def get(kind):
        if kind not in built:
            built[kind] = _build(tmp_path_factory, tiny_ckpt, FLAGS[kind], tag=kind)
        return built[kind]
    return get


@pytest.fixture(params=list(FLAGS))
def quantized(request, quantized_build):
    return request.param, quantized_build(request.param)


def _manifest(out):
    return json.loads((out / "manifest.json").read_text())


def _images(build_dir, backend="onnxruntime", cases=CASES):
    pipe = Pipeline(build_dir, backend=backend)
    return [np.asarray(pipe(p, height=h, width=w, seed=i, progress=False)[0]) for i, (p, h, w) in enumerate(cases)]


def test_end_to_end_psnr_against_float32(quantized, tiny_fp32):
    """ONNX Runtime on the CPU runs the quantized graphs; same seed, PSNR against the float32 graphs."""
    kind, out = quantized
    ref, got = _images(tiny_fp32), _images(out)
    values = [psnr(a, b) for a, b in zip(got, ref)]
    print(kind, ["%.2f" % v for v in values])
    assert all(np.isfinite(v) for v in values)  # quantization changed something
    assert min(values) >= PSNR_MIN[kind]


def test_graphs_and_manifest(quantized, tiny_ckpt):
    kind, out = quantized
    scheme = kind.split("-")[0]
    manifest = _manifest(out)
    comps = manifest["components"]
    assert sorted(n for n, c in comps.items() if "quantization" in c) == sorted(QUANTIZED[kind])
    for name in QUANTIZED[kind]:
        entry = comps[name]
        q = entry["quantization"]
        assert entry["precision"] == scheme and entry["onnx"] == f"onnx/{name}.{scheme}/model.onnx"
        assert entry["unquantized"]["onnx"] == f"onnx/{name}/model.onnx"
        unquantized = onnx.load(str(out / entry["unquantized"]["onnx"]), load_external_data=False)
        expected = qr.expected_layers(tiny_ckpt, name, scheme, unquantized, 32)
        assert len(expected) >= 8
        scales, meta = load_scales(out / q["scales"])
        assert q["scales"] == f"quant/{name}.{scheme}.safetensors"  # as buildfolder.py lays it out, '/' everywhere
        assert set(layers_of(scales)) == expected and meta["scheme"] == scheme
        assert q["exclude"] == list(DEFAULT_EXCLUDE) and q["layers"] == len(expected)
        assert q["weight_bytes"]["after"] < q["weight_bytes"]["before"]
        if kind == "int4-rtn":
            assert q["calibration"] is None and q["awq_scaled"] == 0
        else:
            cal = q["calibration"]
            assert cal["count"] == 8 and len(cal["sha256"]) == 64 and cal["seconds"] > 0
        model = onnx.load(str(out / entry["onnx"]), load_external_data=False)
        domains = {n.domain for n in model.graph.node}
        assert domains <= {"", "ai.onnx"}, domains  # standard-domain Q/DQ only, no trt:: ops
        assert max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")) == 21
        inits = {t.name: t for t in model.graph.initializer}
        qtype = onnx.TensorProto.FLOAT8E4M3FN if scheme == "fp8" else onnx.TensorProto.INT4
        assert {n[: -len(".weight_q")] for n, t in inits.items() if n.endswith(".weight_q")} == expected
        assert {inits[n + ".weight_q"].data_type for n in expected} == {qtype}
        for t in inits.values():  # the sensitive layers stay as they were
            if any(e in t.name for e in DEFAULT_EXCLUDE) and t.name.endswith(".weight"):
                assert t.data_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.BFLOAT16), t.name
        ops = [n.op_type for n in model.graph.node]
        if scheme == "fp8":
            # one activation Q/DQ per layer; FP8 attention: four per attention module (q, k, softmax output, v)
            attention = sum(e.startswith(("layers.", "noise_refiner.")) and e.endswith("attention.qkv")
                            for e in expected) if kind == "fp8-attention" and name == "transformer" else 0
            assert ops.count("QuantizeLinear") == len(expected) + 4 * attention
            assert ops.count("DequantizeLinear") == 2 * len(expected) + 4 * attention
        else:
            assert "QuantizeLinear" not in ops and ops.count("DequantizeLinear") == len(expected)
            awq = ops.count("Mul") - [n.op_type for n in unquantized.graph.node].count("Mul")
            assert awq == (0 if kind == "int4-rtn" else len(expected))


# -- the graphs against an independent implementation ------------------------------------------------------
def test_weight_codes_match_an_independent_implementation(quantized):
    """Every quantized weight's codes and scale in the graph, unpacked by onnx's numpy_helper, equal numpy /
    ml_dtypes quantization of the unquantized graph's weight with the scale file's range; that range is the
    weight's own (per tensor, or per block of 32; AWQ: of the weight divided by its pre-quantization scale)."""
    kind, out = quantized
    manifest = _manifest(out)
    for name in QUANTIZED[kind]:
        comp = manifest["components"][name]
        q = comp["quantization"]
        scales = {k: v.numpy() for k, v in load_scales(out / q["scales"])[0].items()}
        unq = onnx.load(str(out / comp["unquantized"]["onnx"]))
        model = onnx.load(str(out / comp["onnx"]))
        for layer in layers_of(scales):
            w = initializer(unq, layer + ".weight").astype(np.float32)
            pre = scales.get(f"{layer}.pre_quant_scale")
            wp = w if pre is None else w / pre[None, :]
            codes = initializer(model, layer + ".weight_q")
            scale = initializer(model, layer + ".weight_scale")
            amax = scales[f"{layer}.weight_amax"]
            if q["scheme"] == "fp8":
                np.testing.assert_allclose(amax, np.abs(wp).max(), rtol=1e-6)
                assert scale.shape == () and scale == qr.fp8_scale(amax)
                expect = qr.fp8_values(wp, scale)
                assert codes.dtype == expect.dtype and np.array_equal(codes.view(np.uint8), expect.view(np.uint8))
            else:
                assert q["block"] == 32
                np.testing.assert_allclose(amax, np.abs(wp.reshape(w.shape[0], -1, 32)).max(-1), rtol=1e-6)
                assert np.array_equal(scale, qr.int4_scale(amax))
                assert np.array_equal(codes.astype(np.int8), qr.int4_codes(wp, scale, 32)), layer
            if pre is not None:
                assert np.array_equal(initializer(model, f"{layer}.pre_quant_scale"), pre)


class _LayerRun:
    """One run of a graph on sample inputs, with every quantized layer's activation and output read out."""

    def __init__(self, folder: Path, graph: Path, component: str, layers: list[str]):
        manifest = _manifest(folder)
        spec = specs_for(manifest["variant"])[component]
        self.sample = spec.sample(manifest["model"]["facts"], DIMS, torch.float32)
        feeds = {io.name: s.numpy() for io, s in zip(spec.inputs, self.sample)}
        model = onnx.load(str(graph))
        self.io = {layer: linear_io(model, layer) for layer in layers}
        names = [v for pair in self.io.values() for v in pair]
        sess = ort.InferenceSession(with_outputs(model, names).SerializeToString(),
                                    providers=["CPUExecutionProvider"])
        self.values = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, feeds)))
        self.output = self.values[spec.outputs[0].name]
        self.keep = self.sample[1].bool().numpy() if component == "text_encoder" else slice(None)

    def layer(self, layer: str) -> tuple[np.ndarray, np.ndarray]:
        x, y = self.io[layer]
        return self.values[x], self.values[y]


@pytest.fixture(scope="session")
def layer_runs(quantized_build):
    """(kind, component) -> (quantized graph's run, unquantized graph's run, scales, unquantized weights)."""
    runs = {}

    def get(kind, component):
        if (kind, component) not in runs:
            out = quantized_build(kind)
            comp = _manifest(out)["components"][component]
            scales = {k: v.numpy() for k, v in load_scales(out / comp["quantization"]["scales"])[0].items()}
            layers = layers_of(scales)
            unq = onnx.load(str(out / comp["unquantized"]["onnx"]))
            runs[kind, component] = (_LayerRun(out, out / comp["onnx"], component, layers),
                                     _LayerRun(out, out / comp["unquantized"]["onnx"], component, layers),
                                     scales, {k: initializer(unq, k + ".weight") for k in layers})
        return runs[kind, component]
    return get


def _reference_error(run: _LayerRun, scales: dict, weights: dict, scheme: str) -> float:
    """Worst relative distance of a graph's layer outputs from the independent reference on the same
    activations."""
    return max(qr.rel(run.layer(k)[1], qr.linear(run.layer(k)[0], w, scheme, scales, k, 32))
               for k, w in weights.items())


@pytest.mark.parametrize("kind", list(FLAGS))
def test_graph_layers_match_an_independent_reference(kind, quantized_build, layer_runs):
    """Each quantized layer of the graph (ONNX Runtime), fed the activations the graph computes on sample inputs,
    gives what numpy computes with independently quantized weights (and FP8: activations)."""
    for component in QUANTIZED[kind]:
        run, _, scales, weights = layer_runs(kind, component)
        err = _reference_error(run, scales, weights, kind.split("-")[0])
        print(kind, component, f"graph vs independent reference {err:.1e}")
        assert err <= REF_BOUND


def _truncating_int4_blocks(w, block, amax=None):
    """A broken INT4 writer: codes truncated toward zero instead of rounded to nearest."""
    from zimage_deploy.numerics import int4_blocks

    _, scale = int4_blocks(w, block, amax)
    blocks = w.float().reshape(w.shape[0], -1, block) / scale[..., None]
    return torch.trunc(blocks).clamp(-8, 7).reshape(w.shape), scale


@pytest.mark.parametrize("broken", ["int4 truncating", "fp8 without activation Q/DQ"])
def test_the_reference_checks_catch_broken_writers(broken, quantized_build, layer_runs, tmp_path, monkeypatch):
    """The broken writers, run on the same scales: the codes and the layer outputs miss the independent reference
    by far more than its bound."""
    from zimage_deploy import schemes
    from zimage_deploy.quantize import qdq

    kind = "int4-rtn" if broken.startswith("int4") else "fp8"
    scheme = kind.split("-")[0]
    out = quantized_build(kind)
    _, _, scales, weights = layer_runs(kind, "transformer")
    torch_scales = {k: torch.from_numpy(v) for k, v in scales.items()}
    if broken == "int4 truncating":
        monkeypatch.setattr(schemes, "int4_blocks", _truncating_int4_blocks)  # INT4's Q/DQ writer
    else:
        torch_scales = {k: v for k, v in torch_scales.items() if not k.endswith(".input_amax")}
    qdq.quantize_graph(out / "onnx" / "transformer", tmp_path / "q", scheme, 32, torch_scales, progress=False)
    run = _LayerRun(out, tmp_path / "q" / "model.onnx", "transformer", list(weights))
    err = _reference_error(run, scales, weights, scheme)
    print(broken, f"graph vs independent reference {err:.1e}")
    assert err > 100 * REF_BOUND
    if broken == "int4 truncating":
        model = onnx.load(str(tmp_path / "q" / "model.onnx"))
        layer = next(iter(weights))
        scale = initializer(model, layer + ".weight_scale")
        assert not np.array_equal(initializer(model, layer + ".weight_q").astype(np.int8),
                                  qr.int4_codes(weights[layer], scale, 32))


# -- the Torch backend's emulation against the graphs -------------------------------------------------------
EMULATION = "emulation"
BROKEN = ("no fake quantization", "no activation quantization")  # the emulation without (part of) its work


def _torch_backend(out: Path, manifest: dict, candidate: str, components) -> TorchBackend:
    if candidate == "no fake quantization":
        return TorchBackend(out, unquantized_manifest(manifest), device="cpu")
    backend = TorchBackend(out, manifest, device="cpu")
    if candidate == "no activation quantization":  # the emulation's activation pre-hooks removed
        for component in components:
            for module in _modules(backend, component).values():
                module._forward_pre_hooks.clear()
    return backend


def _modules(backend: TorchBackend, component: str) -> dict:
    backend.model(component)
    return dict(backend.models[LOADER_OF.get(component, component)].named_modules())


def _emulation_errors(kind, candidate, quantized_build, layer_runs, fp8=False):
    """Worst per-layer and whole-component distance of a Torch backend from the graphs, relative to the
    quantization effect (graph minus unquantized graph)."""
    out = quantized_build(kind)
    manifest = _manifest(out)
    backend = TorchBackend(out, manifest, device="cpu", torch_mode="compiled", compile_backend="eager") if fp8 else \
        _torch_backend(out, manifest, candidate, QUANTIZED[kind])
    layer_err = component_err = 0.0
    for component in QUANTIZED[kind] if not fp8 else ["transformer"]:
        run, ref_run, scales, weights = layer_runs(kind, component)
        modules = _modules(backend, component)
        for layer, w in weights.items():
            x, y = run.layer(layer)
            with torch.no_grad():
                got = modules[layer](torch.from_numpy(x)).float().numpy()
            layer_err = max(layer_err, qr.rel(got, y) * np.linalg.norm(y) / np.linalg.norm(y - x @ w.T))
        with torch.no_grad():
            got = backend.model(component)(*run.sample)
        got, graph, unq = (np.asarray(a, np.float32)[run.keep] for a in (got.float(), run.output, ref_run.output))
        component_err = max(component_err, float(np.linalg.norm(got - graph) / np.linalg.norm(graph - unq)))
    return layer_err, component_err


@pytest.mark.parametrize("kind,candidate", [(k, c) for k in FLAGS for c in (EMULATION, *BROKEN)
                                            if c != "no activation quantization" or k.startswith("fp8")])
def test_torch_backend_emulates_the_graphs(kind, candidate, quantized_build, layer_runs):
    """The Torch backend applies the same scales with the same arithmetic as the Q/DQ graphs: each quantized
    layer fed the graph's activations gives the graph's output, and each quantized component the graph's output
    up to FP8 rounding flips. The broken candidates (same backend, fake quantization or its activation part left
    out) are run through the same bounds and must be caught."""
    layer_err, component_err = _emulation_errors(kind, candidate, quantized_build, layer_runs)
    print(kind, candidate, f"per layer {layer_err:.1e}, per component {component_err:.2f} of the quantization effect")
    if candidate == EMULATION:
        assert layer_err <= LAYER_BOUND and component_err <= COMPONENT_BOUND
    else:
        assert layer_err > 100 * LAYER_BOUND  # 0.73 without activation quantization, 1.0 without any
        if candidate == "no fake quantization":
            assert component_err > 2 * COMPONENT_BOUND


def test_torch_fp8_path_uses_the_graph_scales(quantized_build, layer_runs):
    """The Torch backend's FP8 path (`torch._scaled_mm`, which torch also runs on the CPU) takes the FP8 graphs'
    calibrated static scales, layer for layer, and computes their layers: it rounds its matmul outputs to BF16
    (2^-9 relative), which is 0.05 of the FP8 quantization effect (measured 0.047); without its activation
    quantization it would be 0.73, without any quantization 1.0."""
    from zimage_deploy.models.fast import FP8Linear
    from zimage_deploy.numerics import E4M3_MAX

    out = quantized_build("fp8")
    manifest = _manifest(out)
    scales, _ = load_scales(out / manifest["components"]["transformer"]["quantization"]["scales"])
    backend = TorchBackend(out, manifest, device="cpu", torch_mode="compiled", compile_backend="eager")
    fp8 = {n: m for n, m in _modules(backend, "transformer").items() if isinstance(m, FP8Linear)}
    assert sorted(fp8) == layers_of(scales)
    for name, m in fp8.items():
        assert torch.allclose(m.input_scale, scales[f"{name}.input_amax"] / E4M3_MAX)
        assert torch.allclose(m.weight_scale, scales[f"{name}.weight_amax"] / E4M3_MAX)
    layer_err, component_err = _emulation_errors("fp8", None, quantized_build, layer_runs, fp8=True)
    print(f"torch fp8 path vs fp8 graphs: per layer {layer_err:.3f}, per component {component_err:.2f}")
    assert layer_err <= 0.1 and component_err <= 0.75  # per component: FP8 flips spread (measured 0.42-0.53)


# -- the quality gate's figures, recomputed ------------------------------------------------------------------
def test_quality_gate_figures_are_what_they_say(quantized_build):
    """The gate's first row recomputed here: the quantized and the unquantized graphs on ONNX Runtime, the first
    held-out prompt, seed 0, at the recorded size; image PSNR and final-latent cosine computed with numpy. The
    verdict follows from the recorded figures and thresholds."""
    out = quantized_build("fp8")
    manifest = _manifest(out)
    gate = manifest["stages"]["quantize"]["quality_gate"]
    side = gate["size"][0]
    assert gate["method"].startswith("onnxruntime") and gate["size"] == [side, side]
    row = gate["prompts"][0]
    assert (row["prompt"], row["seed"]) == (GATE_PROMPTS[0], 0)
    lat, img = {}, {}
    for k, m in (("q", manifest), ("ref", unquantized_manifest(manifest))):
        pipe = Pipeline(out, OnnxRuntimeBackend(out, m))
        lat[k] = pipe(row["prompt"], height=side, width=side, seed=0, output="latent", progress=False)
        img[k] = np.asarray(pipe.decode(lat[k], "pil")[0], dtype=np.float64)
    mse = np.mean((img["q"] - img["ref"]) ** 2)
    a, b = (lat[k].double().flatten().numpy() for k in ("q", "ref"))
    assert row["psnr_db"] == pytest.approx(10 * np.log10(255**2 / mse), abs=0.006)
    assert row["latent_cosine"] == pytest.approx(a @ b / np.linalg.norm(a) / np.linalg.norm(b), abs=6e-6)
    assert row["latent_cosine"] < 1 and np.isfinite(row["psnr_db"])  # quantization changed the image
    assert gate["min_psnr_db"] == min(r["psnr_db"] for r in gate["prompts"])
    thresholds = gate["thresholds"]
    assert gate["passed"] == (gate["min_psnr_db"] >= thresholds["psnr_db"]
                              and gate["min_latent_cosine"] >= thresholds["latent_cosine"])


def test_rebuild_is_up_to_date(quantized_build, tiny_ckpt, capsys):
    kind = "int4"
    out = quantized_build(kind)
    before = _manifest(out)["components"]
    assert build.main(["--model", str(tiny_ckpt), "--target", "cpu", "--out", str(out), "--skip-parity", *CALIB,
                       *FLAGS[kind]]) == 0
    log = capsys.readouterr()
    assert "[quantize] transformer: up to date, skipped" in log.out + log.err
    after = _manifest(out)["components"]
    assert after["transformer"]["onnx_sha256"] == before["transformer"]["onnx_sha256"]


def test_quality_gate_fails_the_build(tmp_path, tiny_ckpt):
    out = tmp_path / "b"
    with pytest.raises(UserError, match="quality gate failed"):
        build.main(["--model", str(tiny_ckpt), "--target", "cpu", "--out", str(out), "--skip-parity", *CALIB,
                    "--precision", "fp8", "--min-psnr", "200", "--gate-prompts", "1"])
    manifest = _manifest(out)
    assert manifest["components"]["transformer"]["status"] == "rejected"
    assert manifest["stages"]["quantize"]["status"] == "failed"
    with pytest.raises(UserError, match="rejected by the build's quality gate"):
        Pipeline(out, backend="onnxruntime")


@pytest.mark.parametrize("content, message", [
    ("", "holds no prompt"), ("# only a comment\n\n   \n", "holds no prompt"), (b"\xff\xfe\x00bad", "not UTF-8"),
])
def test_calibration_prompt_file_errors(tmp_path, tiny_ckpt, content, message):
    path = tmp_path / "prompts.txt"
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    out = tmp_path / "b"
    with pytest.raises(UserError, match=message):
        build.main(["--model", str(tiny_ckpt), "--target", "cpu", "--out", str(out), "--precision", "fp8",
                    "--calib-prompts", str(path)])
    assert not out.exists()  # stopped before writing anything


def test_prompt_files():
    shipped = load_prompts(None)
    assert len(shipped) >= 64 and len(set(shipped)) == len(shipped)
    assert sum(any("\u4e00" <= ch <= "\u9fff" for ch in p) for p in shipped) >= 16  # Chinese ones too
    assert load_prompts(SHIPPED_PROMPTS, 5) == shipped[:5]
    with pytest.raises(UserError, match="does not exist"):
        load_prompts(Path("/nonexistent/prompts.txt"))
    with pytest.raises(UserError, match="holds only"):
        load_prompts(None, 1000)


@pytest.mark.parametrize("flags", [["--precision", "fp8", "--fp8-attention"], ["--precision", "int4"]],
                         ids=["fp8", "int4"])
def test_tensorrt_rtx_engines_of_quantized_graphs(tmp_path_factory, tiny_ckpt, flags):
    """The FP8 and INT4 graphs (BF16 base) build as TensorRT-RTX SM89 engines; the networks TensorRT parses from
    them hold exactly the expected layers' low-precision weights and (FP8) one activation quantization per layer
    plus four per attention module. The quality gate of this BF16 build runs on the Torch backend."""
    trt = need("tensorrt_rtx")
    out = _build(tmp_path_factory, tiny_ckpt, flags, target="rtx4090", tag="rtx")
    manifest = _manifest(out)
    assert manifest["stages"]["quantize"]["quality_gate"]["method"].startswith("torch")
    scheme = flags[1]
    cfg = json.loads((tiny_ckpt / "transformer" / "config.json").read_text())
    for name in ["transformer"] + (["text_encoder"] if scheme == "int4" else []):
        comp = manifest["components"][name]
        assert comp["engine"]["status"] == "complete" and (out / comp["engine"]["plan"]).stat().st_size > 0
        assert comp["onnx"].endswith(f"{name}.{scheme}/model.onnx")
        unquantized = onnx.load(str(out / comp["unquantized"]["onnx"]), load_external_data=False)
        expected = qr.expected_layers(tiny_ckpt, name, scheme, unquantized, 32)
        logger = trt.Logger(trt.Logger.ERROR)
        network = trt.Builder(logger).create_network(0)
        assert trt.OnnxParser(network, logger).parse_from_file(str(out / comp["onnx"]))
        layers = [network.get_layer(i) for i in range(network.num_layers)]
        low = trt.DataType.FP8 if scheme == "fp8" else trt.DataType.INT4
        consts = [la for la in layers if la.type == trt.LayerType.CONSTANT and la.get_output(0).dtype == low]
        assert len(consts) == len(expected)
        quants = [la for la in layers if la.type == trt.LayerType.QUANTIZE]
        attention = cfg["n_layers"] + cfg["n_refiner_layers"]  # per-step attention modules, FP8 Q/DQ'd
        assert len(quants) == (len(expected) + 4 * attention if scheme == "fp8" else 0)
