"""The quantize stage: calibrated FP8 (W8A8, optional FP8 attention) and INT4 (AWQ / RTN, W4A16) graphs of the
tiny model, measured end to end against the float32 graphs with the same seeds; the Torch backend's emulation
against the graphs; the manifest record; the quality gate; errors; TensorRT-RTX engines of the quantized graphs."""

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from zimage_deploy import build
from zimage_deploy.errors import UserError
from zimage_deploy.quantize.gate import psnr
from zimage_deploy.quantize.options import DEFAULT_EXCLUDE, SHIPPED_PROMPTS, load_prompts
from zimage_deploy.runtime.pipeline import Pipeline

CALIB = ["--calib-size", "8"]
# (prompt, height, width): aspect ratios, a Chinese prompt, a long prompt
CASES = [("A red fox in the snow at dawn", 256, 256),
         ("一只橘猫趴在窗台上晒太阳，窗外是开满樱花的街道", 192, 320),
         ("A detailed technical blueprint of a steam locomotive, white lines on blue paper, " * 4, 320, 160)]
PSNR_MIN = {"fp8": 40.0, "fp8-attention": 40.0, "int4": 30.0, "int4-rtn": 30.0}
FLAGS = {"fp8": ["--precision", "fp8"], "fp8-attention": ["--precision", "fp8", "--fp8-attention"],
         "int4": ["--precision", "int4"], "int4-rtn": ["--precision", "int4", "--int4-method", "rtn"]}


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


def test_graphs_and_manifest(quantized):
    kind, out = quantized
    scheme = kind.split("-")[0]
    manifest = json.loads((out / "manifest.json").read_text())
    comps = manifest["components"]
    names = ["transformer"] + (["text_encoder"] if scheme == "int4" else [])
    for name in names:
        entry = comps[name]
        q = entry["quantization"]
        assert entry["precision"] == scheme and entry["onnx"] == f"onnx/{name}.{scheme}/model.onnx"
        assert entry["unquantized"]["onnx"] == f"onnx/{name}/model.onnx"
        assert q["exclude"] == list(DEFAULT_EXCLUDE) and q["layers"] > 0
        assert q["weight_bytes"]["after"] < q["weight_bytes"]["before"]
        assert (out / q["scales"]).is_file()
        if kind == "int4-rtn":
            assert q["calibration"] is None and q["awq_scaled"] == 0
        else:
            cal = q["calibration"]
            assert cal["count"] == 8 and len(cal["sha256"]) == 64 and cal["seconds"] > 0
        model = onnx.load(str(out / entry["onnx"]), load_external_data=False)
        domains = {n.domain for n in model.graph.node}
        assert domains <= {"", "ai.onnx"}, domains  # standard-domain Q/DQ only, no trt:: ops
        assert max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")) == 21
        ops = [n.op_type for n in model.graph.node]
        inits = {t.name: t for t in model.graph.initializer}
        qtype = onnx.TensorProto.FLOAT8E4M3FN if scheme == "fp8" else onnx.TensorProto.INT4
        assert sum(t.data_type == qtype for n, t in inits.items() if n.endswith(".weight_q")) == q["layers"]
        for t in inits.values():  # the sensitive layers stay as they were
            if any(e in t.name for e in DEFAULT_EXCLUDE) and t.name.endswith(".weight"):
                assert t.data_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.BFLOAT16), t.name
        if scheme == "fp8":
            attn = 4 * q["attention_qdq"]
            assert ops.count("QuantizeLinear") == q["activation_qdq"] + attn == q["layers"] + attn
            assert (q["attention_qdq"] > 0) == (kind == "fp8-attention")
        elif kind == "int4":
            assert ops.count("Mul") - _muls(out / entry["unquantized"]["onnx"]) == q["awq_scaled"] > 0
    gate = manifest["stages"]["quantize"]["quality_gate"]
    assert gate["passed"] and gate["min_psnr_db"] >= 20 and gate["min_latent_cosine"] >= 0.95
    assert gate["method"].startswith("onnxruntime")


def _muls(path):
    return [n.op_type for n in onnx.load(str(path), load_external_data=False).graph.node].count("Mul")


def test_torch_backend_emulates_the_graphs(quantized):
    """The Torch backend applies the same scales with the same arithmetic as the Q/DQ graphs."""
    kind, out = quantized
    cases = CASES[:2]
    values = [psnr(a, b) for a, b in zip(_images(out, "torch", cases), _images(out, "onnxruntime", cases))]
    print(kind, ["%.2f" % v for v in values])
    assert min(values) >= 40.0  # vs ~30-45 dB between quantized and float32: the emulation is the graph


def test_rebuild_is_up_to_date(quantized_build, tiny_ckpt, capsys):
    kind = "int4"
    out = quantized_build(kind)
    before = json.loads((out / "manifest.json").read_text())["components"]
    assert build.main(["--model", str(tiny_ckpt), "--target", "cpu", "--out", str(out), "--skip-parity", *CALIB,
                       *FLAGS[kind]]) == 0
    log = capsys.readouterr()
    assert "[quantize] transformer: up to date, skipped" in log.out + log.err
    after = json.loads((out / "manifest.json").read_text())["components"]
    assert after["transformer"]["onnx_sha256"] == before["transformer"]["onnx_sha256"]


def test_text_encoder_fp8(tmp_path_factory, tiny_ckpt, tiny_fp32):
    out = _build(tmp_path_factory, tiny_ckpt, ["--precision", "fp8", "--text-encoder-precision", "fp8"], tag="te8")
    comps = json.loads((out / "manifest.json").read_text())["components"]
    assert comps["text_encoder"]["precision"] == comps["transformer"]["precision"] == "fp8"
    assert comps["text_encoder"]["quantization"]["activation_qdq"] > 0
    assert min(psnr(a, b) for a, b in zip(_images(out, cases=CASES[:2]), _images(tiny_fp32, cases=CASES[:2]))) >= 35


def test_quality_gate_fails_the_build(tmp_path, tiny_ckpt):
    out = tmp_path / "b"
    with pytest.raises(UserError, match="quality gate failed"):
        build.main(["--model", str(tiny_ckpt), "--target", "cpu", "--out", str(out), "--skip-parity", *CALIB,
                    "--precision", "fp8", "--min-psnr", "200", "--gate-prompts", "1"])
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["components"]["transformer"]["status"] == "rejected"
    assert manifest["stages"]["quantize"]["status"] == "failed"
    with pytest.raises(UserError, match="not a complete build"):
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


def test_edit_is_refused_clearly(tmp_path, edit_ckpt):
    with pytest.raises(UserError, match="edit variant"):
        build.main(["--model", str(edit_ckpt), "--variant", "edit", "--target", "cpu", "--precision", "fp8",
                    "--out", str(tmp_path / "b")])
    assert not (tmp_path / "b").exists()


@pytest.mark.parametrize("flags", [["--precision", "fp8", "--fp8-attention"], ["--precision", "int4"]],
                         ids=["fp8", "int4"])
def test_tensorrt_rtx_engines_of_quantized_graphs(tmp_path_factory, tiny_ckpt, flags):
    """The FP8 and INT4 graphs (BF16 base) build as TensorRT-RTX SM89 engines; the parsed networks hold the Q/DQ.
    The quality gate of this BF16 build runs on the Torch backend (emulated quantization)."""
    trt = pytest.importorskip("tensorrt_rtx")
    out = _build(tmp_path_factory, tiny_ckpt, flags, target="rtx4090", tag="rtx")
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["stages"]["quantize"]["quality_gate"]["method"].startswith("torch")
    scheme = flags[1]
    for name in ["transformer"] + (["text_encoder"] if scheme == "int4" else []):
        comp = manifest["components"][name]
        assert comp["engine"]["status"] == "complete" and (out / comp["engine"]["plan"]).stat().st_size > 0
        assert comp["onnx"].endswith(f"{name}.{scheme}/model.onnx")
        logger = trt.Logger(trt.Logger.ERROR)
        builder = trt.Builder(logger)
        network = builder.create_network(0)
        assert trt.OnnxParser(network, logger).parse_from_file(str(out / comp["onnx"]))
        layers = [network.get_layer(i) for i in range(network.num_layers)]
        low = trt.DataType.FP8 if scheme == "fp8" else trt.DataType.INT4
        consts = [la for la in layers if la.type == trt.LayerType.CONSTANT and la.get_output(0).dtype == low]
        assert len(consts) == comp["quantization"]["layers"]
        if scheme == "fp8":
            quants = [la for la in layers if la.type == trt.LayerType.QUANTIZE]
            q = comp["quantization"]
            assert len(quants) == q["activation_qdq"] + 4 * q["attention_qdq"] > q["layers"]


def test_torch_fp8_path_uses_the_graph_scales(quantized_build):
    """The Torch backend's FP8 path (`torch._scaled_mm`, which torch also runs on the CPU) takes the FP8 graphs'
    calibrated static scales, layer for layer, and gives their image."""
    from zimage_deploy.models.fast import FP8Linear
    from zimage_deploy.numerics import E4M3_MAX
    from zimage_deploy.quantize.calibrate import load_scales
    from zimage_deploy.runtime.backends import TorchBackend

    out = quantized_build("fp8")
    manifest = json.loads((out / "manifest.json").read_text())
    scales, _ = load_scales(out / manifest["components"]["transformer"]["quantization"]["scales"])
    backend = TorchBackend(out, manifest, device="cpu", fp8=True)
    pipe = Pipeline(out, backend)
    got = [np.asarray(pipe(p, height=h, width=w, seed=i, progress=False)[0]) for i, (p, h, w) in enumerate(CASES[:2])]
    fp8 = {n: m for n, m in backend.models["transformer"].named_modules() if isinstance(m, FP8Linear)}
    assert len(fp8) == manifest["components"]["transformer"]["quantization"]["layers"]
    for name, m in fp8.items():
        assert torch.allclose(m.input_scale, scales[f"{name}.input_amax"] / E4M3_MAX)
        assert torch.allclose(m.weight_scale, scales[f"{name}.weight_amax"] / E4M3_MAX)
    values = [psnr(a, b) for a, b in zip(got, _images(out, "onnxruntime", CASES[:2]))]
    print("torch fp8 path vs fp8 graphs", ["%.2f" % v for v in values])
    assert min(values) >= 35.0  # its matmuls round to BF16 outputs; the float32 graph's do not


def test_gate_rerun_reuses_rejected_graphs(tmp_path, tiny_ckpt, capsys):
    """A build rejected by the gate, run again with an attainable threshold, keeps its graphs and passes."""
    out = tmp_path / "b"
    args = ["--model", str(tiny_ckpt), "--target", "cpu", "--out", str(out), "--skip-parity", "--calib-size", "2",
            "--precision", "int4", "--int4-method", "rtn", "--gate-prompts", "1"]
    with pytest.raises(UserError, match="quality gate failed"):
        build.main([*args, "--min-cosine", "1.01"])
    capsys.readouterr()
    assert build.main(args) == 0
    log = capsys.readouterr()
    assert "[quantize] transformer: up to date, skipped" in log.out + log.err
    manifest = json.loads((out / "manifest.json").read_text())
    assert {manifest["components"][n]["status"] for n in ("transformer", "text_encoder")} == {"complete"}
    assert manifest["stages"]["quantize"]["quality_gate"]["passed"]
    Pipeline(out, backend="onnxruntime")  # accepted again
