"""Engine building on a machine without a GPU: plans are streamed to disk as TensorRT serializes them (the plan
is never whole in host memory), and what TensorRT-RTX cannot build ahead of time is refused before anything is
written."""

from __future__ import annotations

import json

import pytest

from zimage_deploy import build
from zimage_deploy.cli import run_cli
from zimage_deploy.engines.builder import _has_cuda

trt = pytest.importorskip("tensorrt_rtx", reason="TensorRT-RTX not installed: pip install 'zimage-deploy[tensorrt-rtx]'")
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
