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
    out = {"ckpt": ckpt}
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


def _reference(ckpt, name, sample):
    """transformers' Qwen3 (hidden_states[-2], real tokens) or our float32 DiT module (checked against diffusers in
    test_dit_parity.py), loaded from the checkpoint without any export."""
    import torch

    with torch.no_grad():
        if name == "text_encoder":
            from transformers import AutoModel

            ids, mask = sample
            model = AutoModel.from_pretrained(ckpt / "text_encoder", dtype=torch.float32).eval()
            return model(input_ids=ids, attention_mask=mask.bool(), output_hidden_states=True).hidden_states[-2]
        from zimage_deploy.models.load import load_dit

        return load_dit(ckpt)(*sample)


@pytest.mark.parametrize("name", ["text_encoder", "transformer"])
def test_lean_graph_computes_the_same(deep_builds, name):
    """Both graphs on ONNX Runtime against a reference computed without any export: equal to 1e-5 relative, and
    to each other to 1e-6 relative; the outputs have a real magnitude and vary over tokens and channels (a graph
    that returned zeros, or one layer's output, would not match)."""
    import json

    import torch

    spec = specs_for("turbo")[name]
    facts = json.loads((deep_builds["off"] / "manifest.json").read_text())["model"]["facts"]
    sample = spec.sample(facts, CHECK_DIMS, torch.float32)
    feeds = {io.name: s.numpy() for io, s in zip(spec.inputs, sample)}
    keep = sample[1].bool().numpy() if name == "text_encoder" else slice(None)  # real tokens only
    lean, full = (ort.InferenceSession(str(deep_builds[k] / "onnx" / name / "model.onnx"),
                                       providers=["CPUExecutionProvider"]).run(None, feeds)[0][keep]
                  for k in ("on", "off"))
    ref = _reference(deep_builds["ckpt"], name, sample).numpy()[keep]
    rel = lambda a, b: float(np.linalg.norm(a - b) / np.linalg.norm(b))  # noqa: E731
    print(f"{name}: lean vs ordinary {rel(lean, full):.1e}, vs reference {rel(lean, ref):.1e}")
    rms = float(np.sqrt(np.mean(ref**2)))
    assert rms > 1e-2 and ref.reshape(-1, ref.shape[-1]).std(0).min() > 1e-3 * rms
    assert rel(lean, ref) <= 1e-5 and rel(full, ref) <= 1e-5
    assert rel(lean, full) <= 1e-6


def test_lean_build_records_itself(deep_builds):
    import json

    manifest = json.loads((deep_builds["on"] / "manifest.json").read_text())
    assert manifest["export"]["lean"] is True
    assert json.loads((deep_builds["off"] / "manifest.json").read_text())["export"]["lean"] is False


def test_lean_edit_transformer_equals_ordinary(tmp_path):
    """The Omni (Edit) step graph, whose wrapper calls a method of the DiT (its layers' node scope lacks the
    wrapper's `dit.` weight prefix): the lean export deepens it to the real depth, the same graph as the ordinary
    export (it stopped with "stamping needs a graph traced with exactly two layers, found []")."""
    import torch

    from zimage_deploy.export.modules import Modules
    from zimage_deploy.export.onnx_export import export_component
    from zimage_deploy.facts import model_facts
    from zimage_deploy.tiny import write_checkpoint

    ckpt = write_checkpoint(tmp_path / "ckpt", dit=dict(n_layers=4, n_refiner_layers=1), seed=5, edit=True)
    facts, modules = model_facts(ckpt), Modules(ckpt, None)
    template, depth = modules.template("transformer", torch.float32)
    export_component("transformer", template, facts, torch.float32, tmp_path / "lean", "edit",
                     weights=modules.weights("transformer"), depth=depth)
    export_component("transformer", modules.module("transformer", torch.float32), facts, torch.float32,
                     tmp_path / "full", "edit")
    lean, full = (graph(tmp_path / k / "transformer" / "model.onnx") for k in ("lean", "full"))
    ops = lambda g: collections.Counter(n.op_type for n in g.graph.node if n.op_type != "Constant")  # noqa: E731
    assert depth == 4 and ops(lean) == ops(full)
    lw = {t.name: numpy_helper.to_array(t) for t in lean.graph.initializer}
    fw = {t.name: numpy_helper.to_array(t) for t in full.graph.initializer}
    assert set(lw) == set(fw) and all(np.array_equal(lw[k], fw[k]) for k in fw)
    assert {k.split(".")[1] for k in lw if k.startswith("layers.")} == {"0", "1", "2", "3"}
    spec = specs_for("edit", facts)["transformer"]
    feeds = {io.name: s.numpy() for io, s in zip(spec.inputs, spec.sample(facts, CHECK_DIMS, torch.float32))}
    a, b = (ort.InferenceSession(str(tmp_path / k / "transformer" / "model.onnx"),
                                 providers=["CPUExecutionProvider"]).run(None, feeds)[0] for k in ("lean", "full"))
    assert np.array_equal(a, b) and float(np.abs(b).mean()) > 0
