"""Graphless builds: a datacenter target without TensorRT (the compiled Torch runtime's build) makes no ONNX graphs
(`build --graphs auto`, the default): the runtime loads the checkpoint, an FP8 build keeps only its calibrated
scales. Checked against the same build with graphs (`--graphs on`): the same scales and the same images bit for bit
(with and without a run-time LoRA); ONNX Runtime refuses the graphless build with the fix; a rebuild skips what is up
to date; schemes whose weight grids the graph rewrite writes (INT4, NVFP4) keep their graphs.
"""

import json
import sys
from pathlib import Path

import numpy as np
import pytest
from safetensors.torch import load_file

from test_lora import H, PROMPT, SEED, STEPS, W, image, make_peft_lora
from zimage_deploy import ZImageRuntime, build
from zimage_deploy.errors import UserError
from zimage_deploy.targets import precision_plan
from zimage_deploy.variants import get_variant

FAST = ["--target", "h100", "--precision", "fp8", "--skip-parity", "--calib-size", "2", "--calib-side", "128",
        "--calib-steps", "2", "--gate-prompts", "1"]
KW = dict(seed=SEED, steps=STEPS, height=H, width=W)


@pytest.fixture(scope="module")
def builds(tiny_ckpt, tmp_path_factory):
    """(graphless, with graphs, build log of the graphless one) — TensorRT absent, as on the lent Hopper machines."""
    mp = pytest.MonkeyPatch()
    mp.setitem(sys.modules, "tensorrt", None)
    d = Path(tmp_path_factory.mktemp("graphless"))
    lines = []
    try:
        build.build(str(tiny_ckpt), target="h100", precision="fp8", out=d / "none", parity=False,
                    quant=build._quant_options(build._parser().parse_args(FAST)), log=lines.append)
        assert build.main(["--model", str(tiny_ckpt), *FAST, "--graphs", "on", "--no-quality-gate",
                           "--out", str(d / "on")]) == 0
    finally:
        mp.undo()
    return d / "none", d / "on", lines


def test_graphless_build_has_no_graphs(builds):
    none, on, lines = builds
    m = json.loads((none / "manifest.json").read_text())
    assert not (none / "onnx").exists() and (on / "onnx").is_dir()
    assert m["export"] == {"lean": False, "graphs": False} and m["stages"]["export"]["status"] == "skipped"
    assert m["stages"]["parity"]["status"] == "skipped" and m["runtime"]["backend"] == "torch-compiled"
    assert all(c["source"] == "checkpoint" and "onnx" not in c and c["status"] == "complete"
               for c in m["components"].values())
    q = m["components"]["transformer"]["quantization"]
    assert q["scheme"] == "fp8" and q["layers"] > 0 and q["activation_qdq"] == q["layers"]
    assert m["stages"]["quantize"]["quality_gate"]["passed"]
    said = [x for x in lines if x.startswith("[export]")]
    assert len(said) == 1 and "no ONNX graphs" in said[0] and "--graphs on" in said[0]
    # the scales are the calibration's, the same the graph rewrite writes for the build with graphs
    mine, theirs = (load_file(str(b / "quant" / "transformer.fp8.safetensors")) for b in (none, on))
    assert sorted(mine) == sorted(theirs) and all(np.array_equal(mine[k], theirs[k]) for k in mine)


def test_graphless_images_equal_the_build_with_graphs(builds, tiny_ckpt, tmp_path):
    none, on, _ = builds
    lora = make_peft_lora(tiny_ckpt, tmp_path / "lora", 7, ("to_q", "to_v", "w2"), r=8, lora_alpha=16)
    # eager: the compiled mode runs the same modules and scales, checked against eager in test_torch_compiled.py
    a, b = (ZImageRuntime(d, backend="torch", torch_mode="eager") for d in (none, on))
    assert np.array_equal(image(a.generate(PROMPT, **KW)), image(b.generate(PROMPT, **KW)))
    with_lora = [image(rt.generate(PROMPT, loras=[(lora, 1.5)], **KW)) for rt in (a, b)]
    assert np.array_equal(*with_lora)
    assert not np.array_equal(with_lora[0], image(a.generate(PROMPT, **KW)))  # the LoRA did something


def test_onnxruntime_refuses_a_graphless_build(builds):
    none, _, _ = builds
    with pytest.raises(UserError, match="no ONNX graphs.*--backend torch.*--graphs on"):
        ZImageRuntime(none, backend="onnxruntime").generate(PROMPT, **KW)


def test_rebuild_skips_calibration(builds, tiny_ckpt, monkeypatch, capsys):
    none, _, _ = builds
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    before = (none / "quant" / "transformer.fp8.safetensors").stat().st_mtime_ns
    assert build.main(["--model", str(tiny_ckpt), *FAST, "--no-quality-gate", "--out", str(none)]) == 0
    printed = capsys.readouterr()
    assert "[quantize] transformer: up to date, skipped" in printed.out + printed.err
    assert (none / "quant" / "transformer.fp8.safetensors").stat().st_mtime_ns == before


@pytest.mark.parametrize("precision, text, graphless", [("bf16", None, True), ("fp8", None, True),
                                                        ("int4", None, False), ("fp8", "int4", False)])
def test_which_builds_are_graphless(precision, text, graphless):
    plan = precision_plan(precision, "bf16", text)
    assert build._graphless(True, get_variant("turbo"), plan) is graphless
    assert build._graphless(False, get_variant("turbo"), plan) is False  # TensorRT present: engines need graphs
    assert build._graphless(True, get_variant("edit"), precision_plan("bf16", "bf16")) is False


def test_graphs_option_refused_when_bad(tiny_ckpt, tmp_path):
    with pytest.raises(SystemExit) as e:
        build.main(["--model", str(tiny_ckpt), "--target", "h100", "--graphs", "off", "--out", str(tmp_path / "x")])
    assert e.value.code == 2 and not (tmp_path / "x").exists()
    with pytest.raises(UserError, match="graphs must be"):
        build.build(str(tiny_ckpt), target="h100", out=tmp_path / "y", graphs="maybe")
    assert not (tmp_path / "y").exists()


def test_lora_branches_reserved_before_compiling_a_graphless_build(builds):
    """`lora_bounds` (branches installed before the DiT is compiled) read the adaptable layers from the checkpoint
    when the build has no graphs, as the branches of a first LoRA do."""
    from zimage_deploy import manifest as manifest_io
    from zimage_deploy.models.lora_branch import branches
    from zimage_deploy.runtime.torch_fast import TorchBackend

    none, on, _ = builds
    counts = []
    for d in (none, on):
        backend = TorchBackend(d, manifest_io.load(d), torch_mode="compiled", lora_bounds=(8, 1))
        backend.model("transformer")  # reserves the branches, then wraps the blocks for compiling (lazily)
        counts.append(len(branches(backend.eager_models["transformer"])))
    assert counts[0] == counts[1] > 0
