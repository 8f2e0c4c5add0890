"""The targets table: the cards people own, each with its memory, compute capability, the precisions its tensor
cores run, datasheet peaks and a default precision that fits; TensorRT-RTX builds each SM's engines on this CPU."""

from __future__ import annotations

import json
import re

import pytest

from conftest import need
from zimage_deploy import build
from zimage_deploy.cli import run_cli
from zimage_deploy.errors import UserError
from zimage_deploy.plan import make_plan
from zimage_deploy.targets import TARGETS, get_target

# the names -> (GiB, compute capability)
CARDS = {
    "rtx4080": (16, (8, 9)), "rtx4080super": (16, (8, 9)), "rtx4070tisuper": (16, (8, 9)),
    "rtx4060ti16": (16, (8, 9)), "rtx4070": (12, (8, 9)), "rtx4070super": (12, (8, 9)),
    "rtx5080": (16, (12, 0)), "rtx5070ti": (16, (12, 0)), "rtx5060ti16": (16, (12, 0)), "rtx5070": (12, (12, 0)),
    "rtx3090": (24, (8, 6)), "rtx3080": (10, (8, 6)), "rtx3060": (12, (8, 6)),
    "rtx6000ada": (48, (8, 9)), "rtxpro6000": (96, (12, 0)), "rtx4090": (24, (8, 9)), "rtx5090": (32, (12, 0)),
}
GPUS = [name for name, t in TARGETS.items() if t.compute_capability is not None]


@pytest.mark.parametrize("name", sorted(CARDS))
def test_cards_memory_and_architecture(name):
    t = get_target(name)
    assert (t.memory_gib, t.compute_capability) == CARDS[name]
    assert t.flavour == "tensorrt-rtx"  # GeForce / workstation: built ahead of time on any machine


@pytest.mark.parametrize("name", GPUS)
def test_every_gpu_target_has_its_peaks_and_hardware_precisions(name):
    """Peaks for the planner's floor (an FP8 / FP4 peak exactly where the tensor cores have them); precisions
    follow the architecture: FP8 from Ada (SM89), NVFP4 on Blackwell only; INT4 (weight-only) and BF16 everywhere."""
    t = get_target(name)
    p = t.peaks
    assert p is not None and p.bf16 > 0 and p.bandwidth > 0 and p.pcie > 0
    has_fp8, has_fp4 = t.compute_capability >= (8, 9), t.compute_capability[0] >= 10
    assert ("fp8" in t.precisions) == has_fp8 == (p.fp8 is not None)
    assert ("nvfp4" in t.precisions) == has_fp4 == (p.nvfp4 is not None)
    assert {"bf16", "int4"} <= set(t.precisions) and t.default_precision in t.precisions
    if has_fp8:
        assert p.fp8 > p.bf16


def test_geforce_peaks_match_the_published_figures():
    """Tensor cores x boost clock x 256 FLOP/clock reproduces NVIDIA's datasheets (dense FP4 = half the marketed
    sparse "AI TOPS"; dense FP16 with FP16 accumulate on Ampere)."""
    assert get_target("rtx5080").peaks.nvfp4 == pytest.approx(1801 / 2, rel=0.01)
    assert get_target("rtx5070").peaks.nvfp4 == pytest.approx(988 / 2, rel=0.01)
    assert get_target("rtx5060ti16").peaks.nvfp4 == pytest.approx(759 / 2, rel=0.01)
    assert get_target("rtx3090").peaks.bf16 * 2 == pytest.approx(142, rel=0.01)
    assert get_target("rtx4080").peaks.fp8 == pytest.approx(389.9, rel=0.01)


@pytest.mark.parametrize("name,precision", [("rtx3090", "fp8"), ("rtx3060", "nvfp4"), ("rtx4080", "nvfp4")])
def test_missing_tensor_cores_are_refused_clearly(name, precision):
    with pytest.raises(UserError, match="has no (FP8|FP4) tensor cores"):
        get_target(name).check_precision(precision)


def test_build_refuses_what_ampere_lacks(tmp_path, capsys):
    for argv in (["--precision", "fp8"], ["--precision", "int4", "--text-encoder-precision", "fp8"]):
        out = tmp_path / "b"
        assert run_cli(lambda: build.main(["--model", "tiny", "--target", "rtx3060", *argv, "--out", str(out)])) == 2
        err = capsys.readouterr().err
        assert err.startswith("error:") and "fp8" in err and not out.exists()


@pytest.mark.parametrize("name", GPUS)
def test_default_precision_keeps_everything_resident(name):
    """The default (with its text encoder) keeps every engine resident at 1024², 8 steps — on 16 and 12 GB Ada /
    Blackwell cards FP8 with an INT4 text encoder, on Ampere below 24 GB INT4 — while BF16 does not fit there."""
    t = get_target(name)
    p = make_plan(name, t.default_precision, text_encoder=t.text_encoder_for(None, None), advise=False)
    assert p.mode == "all-resident"
    if t.memory_gib < 24:
        assert t.default_precision != "bf16" and make_plan(name, "bf16", advise=False).mode != "all-resident"


def test_rtx_targets_map_to_tensorrt_rtx_compute_capabilities():
    tensorrt_rtx = need("tensorrt_rtx")
    for t in TARGETS.values():
        if t.flavour == "tensorrt-rtx":
            assert hasattr(tensorrt_rtx.ComputeCapability, t.sm), t.name


@pytest.mark.parametrize("name", ["rtx3060", "rtx4080", "rtx5070"])  # one per SM: SM86, SM89, SM120
def test_each_sm_builds_on_the_cpu(name, tiny_bf16, tmp_path):
    """TensorRT-RTX builds the target's SM ahead of time here: the plan names that SM and no other."""
    need("tensorrt_rtx")
    from zimage_deploy.engines.builder import EngineBuilder
    from zimage_deploy.engines.profiles import EngineOptions, profiles
    from zimage_deploy.variants import get_variant

    t = get_target(name)
    facts = json.loads((tiny_bf16 / "manifest.json").read_text())["model"]["facts"]
    shapes = profiles(get_variant("turbo"), facts, EngineOptions())["context_refiner"]
    plan = tmp_path / "context_refiner.plan"
    record = EngineBuilder(t, EngineOptions()).build(tiny_bf16 / "onnx" / "context_refiner" / "model.onnx", shapes,
                                                     plan)
    assert record.compute_capability == tuple(t.compute_capability) and record.bytes == plan.stat().st_size
    major, minor = t.compute_capability
    assert set(re.findall(rb"sm(?:86|89|120)", plan.read_bytes())) == {f"sm{major}{minor}".encode()}


def test_default_text_encoder_only_with_the_default_precision():
    t = get_target("rtx4080")
    assert t.text_encoder_for(None, None) == "int4"  # nothing asked: the target's default pair
    assert t.text_encoder_for("fp8", None) is None  # --precision fp8 asked: its own text encoder (BF16)
    assert t.text_encoder_for(None, "bf16") == "bf16"
    assert get_target("rtx4090").text_encoder_for(None, None) is None
