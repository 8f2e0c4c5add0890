"""The VRAM planner: weights computed from the configs equal what builds write, engine sizes are read from a
build, and the real-size figures and runtime modes agree with independently measured / stated numbers."""

from __future__ import annotations

import pytest

from zimage_deploy import build, plan
from zimage_deploy.checkpoint import read_config
from zimage_deploy.cli import run_cli
from zimage_deploy.plan import GIB, config_weights, make_plan

COMPONENTS = ("text_encoder", "context_refiner", "transformer", "vae_decoder", "vae_encoder")


def _cfgs(ckpt):
    return {k: read_config(ckpt, k) for k in ("transformer", "text_encoder", "vae")}


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_config_weights_equal_the_built_graphs(request, tiny_ckpt, precision):
    """The planner's weights for each component, computed from the configs alone, equal the bytes of the
    initializers the build attached to that component's graph (BF16: norms and timestep embedder in float32)."""
    from zimage_deploy import manifest as manifest_io

    out = request.getfixturevalue(f"tiny_{precision}")
    comps = manifest_io.load(out)["components"]
    computed = config_weights(plan._meta_modules(_cfgs(tiny_ckpt)), {c: precision for c in COMPONENTS})
    assert computed == {c: comps[c]["weight_bytes"] for c in COMPONENTS}


# Measured on real-size random checkpoints by the lean export (benchmarks/reports/quantize-realsize-2026-11-26.md
# and export-memory-2026-11-26.md): graph sizes in GiB.
MEASURED_GIB = {("bf16", "transformer"): 10.79, ("bf16", "text_encoder"): 7.31, ("fp8", "transformer"): 5.52,
                ("int4", "transformer"): 2.96, ("int4", "text_encoder"): 2.42, ("bf16", "context_refiner"): 0.68}


@pytest.mark.parametrize("precision,component", sorted(MEASURED_GIB))
def test_real_size_weights_match_the_measured_graphs(precision, component):
    p = make_plan("rtx4090", precision)
    (part,) = [x for x in p.parts if x.name == component]
    assert part.weights / GIB == pytest.approx(MEASURED_GIB[(precision, component)], rel=0.01)


def test_real_size_modes_and_floor():
    """Stated expectations: on a 24 GB card BF16 fits at 1024² with everything resident but not at 2048² (the VAE's
    full-resolution activations), FP8 always; an 80 GB H100 holds everything. The DiT's compute floor is at least
    2 x (transformer parameters) x tokens per step over the datasheet peak (attention adds the rest)."""
    assert make_plan("rtx4090", "bf16").mode == "all-resident"
    assert make_plan("rtx4090", "bf16", 2048, 2048).mode == "low-vram"
    assert make_plan("rtx4090", "fp8", 2048, 2048).mode == "all-resident"
    assert make_plan("h100", "bf16", 2048, 2048).mode == "all-resident"
    h100 = make_plan("h100", "bf16", 1024, 1024)
    dit_params = 6.155e9 - 0.68 * GIB / 2  # the context refiner runs once per prompt, outside the step
    tokens = 64 * 64 + 128
    lower = 8 * 2 * dit_params * tokens / 989.4e12
    assert lower <= h100.floor_seconds["transformer"] <= 1.3 * lower
    assert h100.floor_seconds["total"] > h100.floor_seconds["transformer"]


def test_plan_reads_the_engine_sizes(tmp_path, tiny_ckpt):
    """With --engine-dir the weights are the engine plans' sizes, and each plan holds at least its weights."""
    from zimage_deploy import manifest as manifest_io

    out = tmp_path / "engines"
    assert build.main(["--model", str(tiny_ckpt), "--target", "rtx4090", "--precision", "bf16", "--out", str(out),
                       "--skip-parity"]) == 0
    p = make_plan("rtx4090", "bf16", 256, 256, engine_dir=out)
    comps = manifest_io.load(out)["components"]
    computed = config_weights(plan._meta_modules(_cfgs(tiny_ckpt)), {c: "bf16" for c in COMPONENTS})
    for part in p.parts:
        assert part.source == "engine plan" and part.weights == comps[part.name]["engine"]["bytes"]
        assert part.weights >= computed[part.name]
    assert p.mode == "all-resident"


@pytest.mark.parametrize("argv,message", [
    (["--target", "rtx4090", "--height", "1000"], "multiple of 16"),
    (["--target", "rtx4090", "--width", "0"], "multiple of 16"),
    (["--target", "rtx4090", "--steps", "0"], "--steps must be >= 1"),
    (["--target", "rtx4090", "--precision", "nvfp4"], "not supported on target"),
    (["--engine-dir", "/nonexistent/build"], "has no manifest.json"),
])
def test_plan_errors(argv, message, capsys):
    assert run_cli(lambda: plan.main(argv)) == 2
    assert message in capsys.readouterr().err


def test_plan_cli_table(capsys, tmp_path):
    out = tmp_path / "plan.json"
    assert plan.main(["--target", "rtx5090", "--precision", "nvfp4", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "runtime mode: all-resident" in text and "| transformer | nvfp4 |" in text
    assert out.is_file()


def test_runtime_mode_follows_the_build_plan():
    from zimage_deploy.runtime.backends import planned_low_vram

    assert planned_low_vram({"runtime": {"mode": "low-vram"}}, None) is True
    assert planned_low_vram({"runtime": {"mode": "all-resident"}}, None) is False
    assert planned_low_vram({}, None) is False
    assert planned_low_vram({"runtime": {"mode": "low-vram"}}, False) is False  # asked for explicitly
    assert planned_low_vram({"runtime": {"mode": "all-resident"}}, True) is True
