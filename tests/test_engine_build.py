"""Engine building on a machine without a GPU: plans are streamed to disk as TensorRT serializes them (the plan
is never whole in host memory), and what TensorRT-RTX cannot build ahead of time is refused before anything is
written."""

from __future__ import annotations

import json

import pytest

from conftest import need
from zimage_deploy import build
from zimage_deploy.cli import run_cli
from zimage_deploy.engines.builder import _has_cuda

trt = need("tensorrt_rtx")
pytestmark = pytest.mark.skipif(_has_cuda(), reason="checks the GPU-less (ahead-of-time) build path")


def test_streamed_plan_equals_the_in_memory_one(tmp_path, tiny_ckpt):
    """The plan written chunk by chunk has the size TensorRT's in-memory serialization gives for the same graph
    and profile, and the manifest records that file."""
    out = tmp_path / "b"
    assert build.main(["--model", str(tiny_ckpt), "--target", "rtx4090", "--precision", "bf16", "--out", str(out),
                       "--skip-parity"]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    entry = manifest["components"]["vae_decoder"]
    plan = out / entry["engine"]["plan"]
    assert entry["engine"]["plan"] == "engines/vae_decoder.plan"  # as buildfolder.py lays it out
    assert plan.stat().st_size == entry["engine"]["bytes"] > 1 << 20 and entry["engine"]["stripped"] is False

    logger = trt.Logger(trt.Logger.ERROR)
    builder = trt.Builder(logger)
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = trt.OnnxParser(network, logger)
    assert parser.parse_from_file(str(out / entry["onnx"]))
    config = builder.create_builder_config()
    config.num_compute_capabilities = 1
    config.set_compute_capability(trt.ComputeCapability.SM89, 0)
    profile = builder.create_optimization_profile()
    for name, (lo, opt, hi) in entry["engine"]["profile"].items():
        profile.set_shape(name, lo, opt, hi)
    config.add_optimization_profile(profile)
    in_memory = builder.build_serialized_network(network, config)
    assert in_memory is not None and in_memory.nbytes == plan.stat().st_size
    assert plan.read_bytes()[:4] == bytes(memoryview(in_memory)[:4])


@pytest.mark.parametrize("flag", [["--refittable"], ["--strip-weights", "on"]])
def test_refittable_plans_need_a_gpu(tmp_path, tiny_ckpt, capsys, flag):
    out = tmp_path / "b"
    code = run_cli(lambda: build.main(["--model", str(tiny_ckpt), "--target", "rtx4090", "--out", str(out), *flag]))
    assert code == 2 and "need a GPU at build time" in capsys.readouterr().err
    assert not out.exists()


def test_auto_strip_keeps_weights_without_a_gpu(tmp_path, tiny_ckpt):
    """`--strip-weights auto` (the default) falls back to plans with weights where the builder cannot strip."""
    out = tmp_path / "b"
    assert build.main(["--model", str(tiny_ckpt), "--target", "rtx4090", "--out", str(out), "--skip-parity",
                       "--lean", "on"]) == 0
    comps = json.loads((out / "manifest.json").read_text())["components"]
    assert all(c["engine"]["stripped"] is False for c in comps.values())


def test_external_weights_are_mapped_not_copied(tmp_path, tiny_ckpt, monkeypatch):
    """Graphs with external data (real-size ones) reach the builder as pointers into a memory map of the data file;
    the plan equals the one built from the same graph with inline weights, in size."""
    from zimage_deploy.export import weights as weights_mod

    inline, external = tmp_path / "inline", tmp_path / "external"
    argv = ["--model", str(tiny_ckpt), "--target", "rtx4090", "--precision", "bf16", "--skip-parity"]
    assert build.main([*argv, "--out", str(inline)]) == 0
    monkeypatch.setattr(weights_mod, "EXTERNAL_THRESHOLD", 0)  # every graph's weights in model.onnx.data
    assert build.main([*argv, "--out", str(external)]) == 0
    a, b = (json.loads((d / "manifest.json").read_text())["components"] for d in (inline, external))
    for name in a:
        assert b[name]["external_data"] is True and a[name]["external_data"] is False
        assert (external / "onnx" / name / "model.onnx.data").is_file()
        assert b[name]["engine"]["bytes"] == a[name]["engine"]["bytes"], name


def test_truncated_external_data_is_refused(tmp_path, tiny_ckpt, monkeypatch, capsys):
    from zimage_deploy.export import weights as weights_mod

    out = tmp_path / "b"
    monkeypatch.setattr(weights_mod, "EXTERNAL_THRESHOLD", 0)
    argv = ["--model", str(tiny_ckpt), "--target", "rtx4090", "--precision", "bf16", "--skip-parity", "--out", str(out)]
    assert build.main([*argv, "--skip-engines"]) == 0
    data = out / "onnx" / "vae_decoder" / "model.onnx.data"
    data.write_bytes(data.read_bytes()[:-4096])
    from zimage_deploy.engines.builder import EngineBuilder
    from zimage_deploy.engines.profiles import EngineOptions
    from zimage_deploy.errors import UserError
    from zimage_deploy.targets import get_target

    profile = json.loads((out / "manifest.json").read_text())
    with pytest.raises(UserError, match="beyond model.onnx.data"):
        from zimage_deploy.engines.profiles import profiles
        from zimage_deploy.variants import get_variant

        shapes = profiles(get_variant("turbo"), profile["model"]["facts"], EngineOptions())["vae_decoder"]
        EngineBuilder(get_target("rtx4090"), EngineOptions()).build(out / "onnx/vae_decoder/model.onnx", shapes,
                                                                     tmp_path / "x.plan")
    assert not (tmp_path / "x.plan").exists()


def test_drop_intermediate(tmp_path, tiny_ckpt):
    """--drop-intermediate deletes the unquantized graphs after quantization and each graph once its plan is
    written; the plans and the manifest's hashes stay; the graph backends refuse the build; a rebuild without
    the flag exports again and keeps the engines (same keys)."""
    from zimage_deploy.errors import UserError
    from zimage_deploy.runtime.open import open_pipeline

    out = tmp_path / "b"
    argv = ["--model", str(tiny_ckpt), "--target", "rtx4090", "--precision", "int4", "--int4-method", "rtn",
            "--no-quality-gate", "--skip-parity", "--out", str(out)]
    assert build.main([*argv, "--drop-intermediate"]) == 0
    comps = json.loads((out / "manifest.json").read_text())["components"]
    assert not any((out / "onnx").iterdir())
    assert all(c["dropped"] and (out / c["engine"]["plan"]).is_file() for c in comps.values())
    assert comps["transformer"]["unquantized"]["dropped"] and comps["text_encoder"]["unquantized"]["dropped"]
    with pytest.raises(UserError):
        open_pipeline(out, "onnxruntime")
    plans = {n: c["engine"]["plan_sha256"] for n, c in comps.items()}
    assert build.main(argv) == 0
    comps = json.loads((out / "manifest.json").read_text())["components"]
    assert {n: c["engine"]["plan_sha256"] for n, c in comps.items()} == plans  # engines up to date
    assert all((out / c["onnx"]).is_file() and not c.get("dropped") for c in comps.values())
