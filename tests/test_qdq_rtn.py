"""Round-to-nearest (no calibration) weight-only INT4 / FP8 quantization of exported graphs (layer by layer):
structure, exclusions, and that ONNX Runtime runs the result close to the float32 graph."""

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from zimage_deploy.export.specs import CHECK_DIMS, SPECS
from zimage_deploy.quantize.qdq import quantize_graph as quantize_component
from zimage_deploy.quantize.options import DEFAULT_EXCLUDE as EXCLUDE

# relative L2 error bounds on the tiny random model (random weights quantize worse than trained ones)
BOUND = {"int4": 0.5, "fp8": 0.1}  # a packing or scale bug gives ~1 or more


@pytest.mark.parametrize("scheme", ["int4", "fp8"])
@pytest.mark.parametrize("name", ["transformer", "text_encoder"])
def test_weight_only(tiny_fp32, tmp_path, scheme, name):
    src = tiny_fp32 / "onnx" / name
    summary = quantize_component(src, tmp_path / "q", scheme, block=32)
    model = onnx.load(str(tmp_path / "q" / "model.onnx"))
    dq = [n for n in model.graph.node if n.op_type == "DequantizeLinear"]
    assert len(dq) == len(summary["quantized"]) > 0
    assert max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")) >= 21
    qtype = onnx.TensorProto.INT4 if scheme == "int4" else onnx.TensorProto.FLOAT8E4M3FN
    inits = {t.name: t for t in model.graph.initializer}
    for w in summary["quantized"]:
        assert inits[w + ".weight_q"].data_type == qtype and w + ".weight" not in inits
        assert not any(e in w for e in EXCLUDE)
    assert any("adaLN" in k or "embed_tokens" in k for k in summary["kept"])
    assert summary["bytes_after"] < summary["bytes_before"]

    facts = json.loads((tiny_fp32 / "manifest.json").read_text())["model"]["facts"]
    sample = SPECS[name].sample(facts, dict(CHECK_DIMS, latent_h=16, latent_w=16), torch.float32)
    feeds = {io.name: s.numpy() for io, s in zip(SPECS[name].inputs, sample)}
    ref = ort.InferenceSession(str(src / "model.onnx"), providers=["CPUExecutionProvider"]).run(None, feeds)[0]
    got = ort.InferenceSession(str(tmp_path / "q" / "model.onnx"),
                               providers=["CPUExecutionProvider"]).run(None, feeds)[0]
    rel = np.linalg.norm(got - ref) / np.linalg.norm(ref)
    print(f"{name} {scheme}: rel L2 {rel:.3f}")
    assert 0 < rel <= BOUND[scheme]


def test_nothing_quantizable_is_an_error(tiny_fp32, tmp_path):
    from zimage_deploy.errors import UserError

    with pytest.raises(UserError, match="no weight"):
        quantize_component(tiny_fp32 / "onnx" / "transformer", tmp_path / "q", "int4", block=4096)
    assert not (tmp_path / "q").exists()
