"""Parity at real size: a lean (memory-lean export) BF16 build is checked by evaluating its graphs — cut to a
sample of blocks, weights streamed, BF16 graphs in float32 with their BF16 roundings (export/graph_eval.py) —
against the float32 Torch modules. One build of a five-block checkpoint with two planted graph bugs, weights in
external data files (as real-size graphs have them)."""

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto

from zimage_deploy import build
from zimage_deploy.export import lean_parity, weights
from zimage_deploy.export import stage as export_stage
from zimage_deploy.export.parity import ParityFailed

DEEP = dict(dit=dict(n_layers=5, n_refiner_layers=2), text=dict(num_hidden_layers=5), seed=3)
# the planted bugs: one weight of block 2 of the DiT, and the VAE decoder's first convolution (a BF16 graph's
# weight: the old module-vs-module BF16 check never read the graph)
PLANTS = {"transformer": "layers.2.feed_forward.w2.weight", "vae_decoder": "conv_in.weight"}


def _flip_sign(folder: Path, name: str) -> None:
    """Negate BF16 initializer `name` of the graph in `folder` in place (its external data)."""
    model = onnx.load(str(folder / "model.onnx"), load_external_data=False)
    init = next(t for t in model.graph.initializer if t.name == name or t.name.endswith("." + name))
    assert init.data_type == TensorProto.BFLOAT16 and init.data_location == TensorProto.EXTERNAL
    info = {e.key: e.value for e in init.external_data}
    with open(folder / info["location"], "r+b") as f:
        f.seek(int(info["offset"]))
        raw = np.frombuffer(f.read(int(info["length"])), dtype=np.uint16) ^ np.uint16(0x8000)
        f.seek(int(info["offset"]))
        f.write(raw.tobytes())


def _build_planted(ckpt: Path, out: Path, plants: dict, lean: str) -> dict:
    """A BF16 build of `ckpt` with `plants` made in its graphs right after their export; the manifest."""
    real_export = export_stage.export_component

    def export_and_plant(name, *args, **kwargs):
        entry = real_export(name, *args, **kwargs)
        if name in plants:
            _flip_sign(args[3] / name, plants[name])
        return entry

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(weights, "EXTERNAL_THRESHOLD", 0)
        mp.setattr(export_stage, "export_component", export_and_plant)
        with pytest.raises(ParityFailed, match=".*".join(plants)):
            build.main(["--model", str(ckpt), "--out", str(out), "--lean", lean, "--precision", "bf16"])
    return json.loads((out / "manifest.json").read_text())


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    from zimage_deploy.tiny import write_checkpoint

    return write_checkpoint(Path(tmp_path_factory.mktemp("deep")) / "ckpt", **DEEP)


@pytest.fixture(scope="module")
def planted(ckpt, tmp_path_factory):
    out = Path(tmp_path_factory.mktemp("planted"))
    return _build_planted(ckpt, out, PLANTS, "on"), out


def test_bf16_parity_evaluates_the_graph(ckpt, tmp_path):
    """An ordinary (not lean) BF16 build: the planted graph weight is caught (the old check compared the Torch
    BF16 module with the float32 one and passed it), the other graphs pass."""
    comps = _build_planted(ckpt, tmp_path, {"vae_decoder": PLANTS["vae_decoder"]}, "off")["components"]
    assert comps["vae_decoder"]["status"] == "rejected" and not comps["vae_decoder"]["parity"]["passed"]
    assert "BF16 roundings" in comps["vae_decoder"]["parity"]["method"]
    assert all(comps[n]["parity"]["passed"] for n in comps if n != "vae_decoder")


def test_planted_bugs_reject_the_build(planted):
    manifest, _ = planted
    assert manifest["stages"]["parity"]["status"] == "failed"
    for name in PLANTS:
        entry = manifest["components"][name]
        assert entry["status"] == "rejected" and entry["rejected_by"] == "parity", name
        assert not entry["parity"]["passed"] and entry["parity"]["rel_l2"] > entry["parity"]["tolerance"]
    assert "BF16 roundings" in manifest["components"]["vae_decoder"]["parity"]["method"]


def test_the_wrong_block_is_the_one_flagged(planted):
    """The DiT's figures per checked block: block 0 within tolerance, block 2 (planted) and what follows it not."""
    p = planted[0]["components"]["transformer"]["parity"]
    assert p["blocks"]["checked"] == lean_parity.sample_blocks(5) == [0, 2, 4] and p["blocks"]["of"] == 5
    rel = {f["block"]: f["rel_l2"] for f in p["blocks"]["outputs"]}
    assert rel[0] <= p["tolerance"] < rel[2]


def test_clean_lean_graphs_pass_with_figures(planted):
    """The components without a plant pass, with their figures in the manifest: the text encoder's per block
    (BF16 roundings: over float32's tolerance, within BF16's), cut to 3 of its 4 blocks."""
    comps = planted[0]["components"]
    for name in ("text_encoder", "context_refiner", "vae_encoder"):
        p = comps[name]["parity"]
        assert p["passed"] and comps[name]["status"] == "complete", name
        assert 0 < p["rel_l2"] <= p["tolerance"] == 5e-2 and p["max_abs"] > 0
    p = comps["text_encoder"]["parity"]
    assert p["blocks"]["checked"] == [0, 2, 3] and p["blocks"]["of"] == 4
    assert [f["block"] for f in p["blocks"]["outputs"]] == [0, 2, 3]
    assert all(1e-4 < f["rel_l2"] <= 5e-2 for f in p["blocks"]["outputs"])


def test_cut_keeps_only_the_sampled_blocks_weights(planted):
    """The cut graph names only the sampled blocks' weights (ONNX Runtime reads no others) and chains them."""
    graph = onnx.load(str(planted[1] / "onnx" / "transformer" / "model.onnx"), load_external_data=False)
    cut, outs = lean_parity.cut(graph, "layers", 5, [0, 2, 4])
    blocks = {t.name.split(".")[1] for t in cut.graph.initializer if t.name.startswith("layers.")}
    assert blocks == {"0", "2", "4"} and len(outs) == 3
    assert not any(n.name.startswith(("/layers.1/", "/layers.3/")) for n in cut.graph.node)
    assert len(cut.graph.node) < len(graph.graph.node)
