"""The engines stage with TensorRT-RTX (builds SM89/SM120 plans without a GPU) and the TensorRT backend's
load-time checks. Running engines needs an RTX GPU of the engine's architecture; where there is none those
tests are skipped with that reason."""

import json
import os
import shutil

import pytest
import torch

from zimage_deploy import build
from zimage_deploy.cli import run_cli
from zimage_deploy.engines.profiles import EngineOptions, profiles
from zimage_deploy.errors import UserError
from zimage_deploy.variants import get_variant

try:
    import tensorrt_rtx
except ImportError:  # CI installs it: never skip there
    if os.environ.get("CI"):
        raise
    pytest.skip("tensorrt-rtx-cu12 is not installed (pip install -e '.[tensorrt-rtx]')", allow_module_level=True)

COMPONENTS = ["text_encoder", "context_refiner", "transformer", "vae_decoder", "vae_encoder"]
NO_RTX_GPU = "running TensorRT-RTX engines needs an SM89 GPU (RTX 4090 / L40S class); none is visible here"


def _gpu_is(cc):
    return torch.cuda.is_available() and torch.cuda.get_device_capability() == cc


@pytest.fixture(scope="module", params=["fp32", "bf16"])
def rtx_build(request, tiny_ckpt, tmp_path_factory):
    out = tmp_path_factory.mktemp(f"rtx-{request.param}")
    assert build.main(["--model", str(tiny_ckpt), "--target", "rtx4090", "--precision", request.param,
                       "--out", str(out), "--skip-parity"]) == 0
    return out


def test_engines_built_and_recorded(rtx_build):
    manifest = json.loads((rtx_build / "manifest.json").read_text())
    facts = manifest["model"]["facts"]
    expected_shapes = profiles(get_variant("turbo"), facts, EngineOptions())
    assert manifest["stages"]["engines"]["status"] == "done"
    assert manifest["tensorrt"]["version"] == tensorrt_rtx.__version__
    for name in COMPONENTS:
        eng = manifest["components"][name]["engine"]
        plan = rtx_build / eng["plan"]
        assert eng["status"] == "complete" and plan.is_file() and plan.stat().st_size == eng["bytes"] > 100_000
        assert eng["flavour"] == "tensorrt-rtx" and eng["version"] == tensorrt_rtx.__version__
        assert eng["compute_capability"] == [8, 9]
        assert eng["profile"] == expected_shapes[name]
        assert len(eng["key"]) == 64 and len(eng["plan_sha256"]) == 64


@pytest.mark.skipif(not _gpu_is((8, 9)), reason=NO_RTX_GPU)
def test_engines_deserialize_and_run(rtx_build):
    from zimage_deploy.runtime.pipeline import Pipeline

    pipe = Pipeline(rtx_build, "tensorrt")
    image = pipe("a cat", 128, 128, seed=0, progress=False)[0]
    assert image.size == (128, 128)


def test_unchanged_build_is_skipped(rtx_build, tiny_ckpt, capsys):
    before = json.loads((rtx_build / "manifest.json").read_text())
    assert build.main(["--model", str(tiny_ckpt), "--target", "rtx4090", "--precision", before["precision"],
                       "--out", str(rtx_build), "--skip-parity"]) == 0
    after = json.loads((rtx_build / "manifest.json").read_text())
    assert "transformer: up to date, skipped" in capsys.readouterr().out
    for name in COMPONENTS:
        assert after["components"][name]["engine"] == before["components"][name]["engine"]


def _copy(rtx_build, tmp_path):
    d = tmp_path / "build"
    shutil.copytree(rtx_build, d)
    return d, json.loads((d / "manifest.json").read_text())


def test_truncated_plan_refused(rtx_build, tmp_path):
    from zimage_deploy.runtime.tensorrt_backend import TensorRTBackend

    d, manifest = _copy(rtx_build, tmp_path)
    plan = d / manifest["components"]["transformer"]["engine"]["plan"]
    plan.write_bytes(plan.read_bytes()[: plan.stat().st_size // 2])
    with pytest.raises(UserError, match="truncated or corrupted"):
        TensorRTBackend(d, manifest)


def test_corrupted_plan_refused(rtx_build, tmp_path):
    from zimage_deploy.runtime.tensorrt_backend import TensorRTBackend

    d, manifest = _copy(rtx_build, tmp_path)
    plan = d / manifest["components"]["vae_decoder"]["engine"]["plan"]
    data = bytearray(plan.read_bytes())
    data[len(data) // 2] ^= 0xFF
    plan.write_bytes(bytes(data))
    with pytest.raises(UserError, match="corrupted"):
        TensorRTBackend(d, manifest)


def test_version_mismatch_refused(rtx_build, tmp_path):
    from zimage_deploy.runtime.tensorrt_backend import TensorRTBackend

    d, manifest = _copy(rtx_build, tmp_path)
    manifest["components"]["text_encoder"]["engine"]["version"] = "0.0.1"
    with pytest.raises(UserError, match="built with tensorrt-rtx 0.0.1"):
        TensorRTBackend(d, manifest)


def test_compute_capability_mismatch_refused(rtx_build):
    from zimage_deploy.runtime.tensorrt_backend import check_compat

    manifest = json.loads((rtx_build / "manifest.json").read_text())
    with pytest.raises(UserError, match="built for SM89, this GPU is SM90"):
        check_compat(manifest, tensorrt_rtx.__version__, (9, 0))
    with pytest.raises(UserError, match="needs a CUDA GPU"):
        check_compat(manifest, tensorrt_rtx.__version__, None)
    check_compat(manifest, tensorrt_rtx.__version__, (8, 9))  # the matching case passes


def test_datacenter_target_without_tensorrt(tiny_ckpt, tmp_path, capsys):
    try:
        import tensorrt  # noqa: F401

        pytest.skip("TensorRT is installed here: the missing-TensorRT path cannot be exercised")
    except ImportError:
        pass
    out = tmp_path / "out"
    code = run_cli(lambda: build.main(["--model", str(tiny_ckpt), "--target", "h100", "--precision", "bf16",
                                       "--out", str(out)]))
    err = capsys.readouterr().err
    assert code == 2 and "needs tensorrt" in err and "pip install tensorrt" in err
    assert not out.exists()


def test_static_profile(tiny_ckpt, tmp_path):
    out = tmp_path / "static"
    assert build.main(["--model", str(tiny_ckpt), "--target", "rtx5090", "--precision", "bf16", "--out", str(out),
                       "--static", "128x192", "--static-batch", "2", "--skip-parity"]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    eng = manifest["components"]["transformer"]["engine"]
    assert eng["compute_capability"] == [12, 0]
    assert eng["profile"]["latents"] == [[2, 16, 16, 24]] * 3
    assert manifest["tensorrt"]["options"]["static"] == [128, 192]


def test_real_size_profiles():
    facts = dict(dim=3840, cap_feat_dim=2560, latent_channels=16, vae_scale_factor=8, patch_size=2)
    p = profiles(get_variant("turbo"), facts, EngineOptions())
    assert p["transformer"]["latents"] == [[1, 16, 64, 64], [1, 16, 128, 128], [4, 16, 256, 256]]
    assert p["text_encoder"]["input_ids"] == [[1, 1], [1, 128], [4, 512]]
    assert p["transformer"]["cap_states"][2] == [4, 512, 3840]
    base = profiles(get_variant("base"), facts, EngineOptions())
    assert base["transformer"]["latents"][1][0] == 2  # CFG: tuned for batch 2
    with pytest.raises(UserError, match="multiple of 16"):
        profiles(get_variant("turbo"), facts, EngineOptions(min_side=500))


def test_edit_engines(edit_ckpt, tmp_path):
    out = tmp_path / "edit"
    assert build.main(["--model", str(edit_ckpt), "--variant", "edit", "--target", "rtx4090", "--precision", "bf16",
                       "--out", str(out), "--skip-parity"]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    names = ["text_encoder", "context_refiner", "siglip_refiner", "transformer", "vae_decoder", "vae_encoder",
             "vision_encoder"]
    assert list(manifest["components"]) == names
    for name in names:
        eng = manifest["components"][name]["engine"]
        assert eng["status"] == "complete" and (out / eng["plan"]).stat().st_size == eng["bytes"]
    batch = manifest["components"]["transformer"]["engine"]["profile"]["latents"]
    assert [batch[0][0], batch[1][0], batch[2][0]] == [1, 2, 4]  # CFG: tuned for batch 2
