"""The memory-lean export (two-layer templates deepened in the graph, weights streamed from safetensors)
against the ordinary export (the whole model loaded): the same graphs on deeper checkpoints."""

import collections
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import numpy_helper

from zimage_deploy import build
from zimage_deploy.export.specs import CHECK_DIMS, specs_for

DEEP = dict(dit=dict(n_layers=5, n_refiner_layers=2), text=dict(num_hidden_layers=5), seed=3)


@pytest.fixture(scope="module")
def deep_builds(tmp_path_factory):
    from zimage_deploy.tiny import write_checkpoint

    ckpt = write_checkpoint(Path(tmp_path_factory.mktemp("deep")) / "ckpt", **DEEP)
    out = {}
    for lean in ("on", "off"):
        d = Path(tmp_path_factory.mktemp(f"lean-{lean}"))
        assert build.main(["--model", str(ckpt), "--out", str(d), "--lean", lean, "--skip-parity"]) == 0
        out[lean] = d
    return out


def graph(path):
    return onnx.load(str(path), load_external_data=True)


@pytest.mark.parametrize("name", ["text_encoder", "transformer", "context_refiner"])
def test_lean_graph_equals_ordinary(deep_builds, name):
    lean = graph(deep_builds["on"] / "onnx" / name / "model.onnx")
    full = graph(deep_builds["off"] / "onnx" / name / "model.onnx")
    assert [i.name for i in lean.graph.input] == [i.name for i in full.graph.input]
    assert [o.name for o in lean.graph.output] == [o.name for o in full.graph.output]
    # the same operators (the exporter shares small Constant nodes between layers differently)
    ops = lambda g: collections.Counter(n.op_type for n in g.graph.node if n.op_type != "Constant")  # noqa: E731
    assert ops(lean) == ops(full)
    lw = {t.name: numpy_helper.to_array(t) for t in lean.graph.initializer}
    fw = {t.name: numpy_helper.to_array(t) for t in full.graph.initializer}
    assert set(lw) == set(fw) and len(lw) > 10
    for k in fw:
        assert lw[k].dtype == fw[k].dtype and np.array_equal(lw[k], fw[k]), k
    layers = {k.split(".")[1] for k in lw if k.startswith("layers.")}
    assert len(layers) == (5 if name == "transformer" else 4 if name == "text_encoder" else 0)


@pytest.mark.parametrize("name", ["text_encoder", "transformer"])
def test_lean_graph_computes_the_same(deep_builds, name):
    spec = specs_for("turbo")[name]
    facts = __import__("json").loads((deep_builds["off"] / "manifest.json").read_text())["model"]["facts"]
    sample = spec.sample(facts, CHECK_DIMS, __import__("torch").float32)
    feeds = {io.name: s.numpy() for io, s in zip(spec.inputs, sample)}
    outs = [ort.InferenceSession(str(d / "onnx" / name / "model.onnx"), providers=["CPUExecutionProvider"])
            .run(None, feeds)[0] for d in (deep_builds["on"], deep_builds["off"])]
    np.testing.assert_allclose(outs[0], outs[1], rtol=0, atol=1e-6)


def test_lean_build_records_itself(deep_builds):
    import json

    manifest = json.loads((deep_builds["on"] / "manifest.json").read_text())
    assert manifest["export"]["lean"] is True
    assert json.loads((deep_builds["off"] / "manifest.json").read_text())["export"]["lean"] is False
