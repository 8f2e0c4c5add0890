"""The engines stage with TensorRT-RTX (builds SM89/SM120 plans without a GPU) and the TensorRT backend's
load-time checks.

A plan cannot be deserialized without a GPU, so what TensorRT-RTX built is inspected as it builds: the build runs
with TensorRT's Builder wrapped, and at serialization the network TensorRT parsed (inputs, outputs, their types
and dynamic dims, the precision of every matrix multiply, softmax and normalization) and the optimization
profile handed to it are recorded, then compared with expectations written out here for the tiny model.
Running engines needs an RTX GPU of the engine's architecture; where there is none that test is skipped with that
reason (CI has no GPU)."""

import json
import shutil
import sys

import numpy as np
import pytest
import torch

from conftest import need
from zimage_deploy import build
from zimage_deploy.cli import run_cli
from zimage_deploy.engines import builder as engine_builder
from zimage_deploy.engines.profiles import EngineOptions, profiles
from zimage_deploy.errors import UserError
from zimage_deploy.variants import get_variant

tensorrt_rtx = need("tensorrt_rtx")  # CI installs it: never skipped there

COMPONENTS = ["text_encoder", "context_refiner", "transformer", "vae_decoder", "vae_encoder"]
NO_RTX_GPU = ("running TensorRT-RTX engines needs an SM89 GPU (RTX 4090 / L40S class) and none is visible here; the "
              "Hopper GPUs (H100/H200, SM90) sometimes lent to this project cannot run them either: TensorRT-RTX has "
              "no SM90 (the backend's logic runs on the CPU in tests/test_tensorrt_runtime.py)")

# The tiny model (DiT width 64, caption features 32, text width 32, 16 latent channels, VAE factor 8), written out:
# name -> (TensorRT dtype, dims; -1 dynamic). "compute": FLOAT for fp32 builds, BF16 for bf16 builds.
IO = {
    "text_encoder": ({"input_ids": ("INT64", (-1, -1)), "attention_mask": ("INT64", (-1, -1))},
                     {"hidden_states": ("compute", (-1, -1, 32))}),
    "context_refiner": ({"cap_feats": ("compute", (-1, -1, 32)), "cap_lens": ("INT64", (-1,))},
                        {"cap_states": ("compute", (-1, -1, 64))}),
    "transformer": ({"latents": ("FLOAT", (-1, 16, -1, -1)), "timestep": ("FLOAT", (-1,)),
                     "cap_states": ("compute", (-1, -1, 64)), "cap_lens": ("INT64", (-1,))},
                    {"noise_pred": ("FLOAT", (-1, 16, -1, -1))}),
    "vae_decoder": ({"latents": ("FLOAT", (-1, 16, -1, -1))}, {"image": ("FLOAT", (-1, 3, -1, -1))}),
    "vae_encoder": ({"image": ("FLOAT", (-1, 3, -1, -1))},
                    {"mean": ("FLOAT", (-1, 16, -1, -1)), "std": ("FLOAT", (-1, 16, -1, -1))}),
}
# Profiles of a small model, turbo: batch 1 / 1 / 4, sides 64 / 256 / 512 px (latents 8 / 32 / 64), text 1 / 128 /
# 512 tokens, captions 32 / 128 / 512 (padded to 32).
PROFILES = {
    "text_encoder": {"input_ids": [[1, 1], [1, 128], [4, 512]], "attention_mask": [[1, 1], [1, 128], [4, 512]]},
    "context_refiner": {"cap_feats": [[1, 32, 32], [1, 128, 32], [4, 512, 32]], "cap_lens": [[1], [1], [4]]},
    "transformer": {"latents": [[1, 16, 8, 8], [1, 16, 32, 32], [4, 16, 64, 64]], "timestep": [[1], [1], [4]],
                    "cap_states": [[1, 32, 64], [1, 128, 64], [4, 512, 64]], "cap_lens": [[1], [1], [4]]},
    "vae_decoder": {"latents": [[1, 16, 8, 8], [1, 16, 32, 32], [4, 16, 64, 64]]},
    "vae_encoder": {"image": [[1, 3, 64, 64], [1, 3, 256, 256], [4, 3, 512, 512]]},
}
# layers whose inputs must stay float32 in a BF16 network (the graphs' float32 islands)
FLOAT32_LAYERS = ("SOFTMAX", "NORMALIZATION", "REDUCE")


RECORDS: dict[str, dict] = {}  # build folder -> component -> _summary of what its engine was built from


def _gpu_is(cc):
    return torch.cuda.is_available() and torch.cuda.get_device_capability() == cc


def _summary(trt, network, profile) -> dict:
    """What a network and its optimization profile hold, read while TensorRT builds from them."""
    def io(t):
        return t.name, (t.dtype.name, tuple(t.shape))
    layers = [network.get_layer(i) for i in range(network.num_layers)]
    return {
        "inputs": dict(io(network.get_input(i)) for i in range(network.num_inputs)),
        "outputs": dict(io(network.get_output(i)) for i in range(network.num_outputs)),
        "profile": {network.get_input(i).name: [list(d) for d in profile.get_shape(network.get_input(i).name)]
                    for i in range(network.num_inputs)},
        # (layer type, name, its input dtypes) of the layers whose precision matters
        "layers": [(la.type.name, la.name, [la.get_input(j).dtype.name for j in range(la.num_inputs)
                                            if la.get_input(j) is not None])
                   for la in layers if la.type.name in ("MATRIX_MULTIPLY", "CONVOLUTION", *FLOAT32_LAYERS)],
    }


class _RecordingBuilder:
    """TensorRT's Builder, recording each network it serializes and the profile it was given."""

    def __init__(self, trt, real, record, name):
        self._trt, self._real, self._record, self._name, self._profiles = trt, real, record, name, []

    def __getattr__(self, attr):
        return getattr(self._real, attr)

    def create_optimization_profile(self):
        profile = self._real.create_optimization_profile()
        self._profiles.append(profile)
        return profile

    def _serialize(self, method, network, config, *args):
        assert len(self._profiles) == 1 and config.num_optimization_profiles == 1
        self._record[self._name()] = _summary(self._trt, network, self._profiles[0])
        return getattr(self._real, method)(network, config, *args)

    def build_serialized_network(self, network, config):
        return self._serialize("build_serialized_network", network, config)

    def build_serialized_network_to_stream(self, network, config, writer):
        return self._serialize("build_serialized_network_to_stream", network, config, writer)


class _RecordingTRT:
    """The tensorrt_rtx module with a recording Builder."""

    def __init__(self, record, current):
        self._record, self._current = record, current

    def __getattr__(self, attr):
        return getattr(tensorrt_rtx, attr)

    def Builder(self, logger):  # noqa: N802 - TensorRT's name
        return _RecordingBuilder(tensorrt_rtx, tensorrt_rtx.Builder(logger), self._record, lambda: self._current[0])


@pytest.fixture(scope="module", params=["fp32", "bf16"])
def rtx_build(request, tiny_ckpt, tmp_path_factory):
    """The build folder, and component -> what TensorRT-RTX was handed to build its engine."""
    out = tmp_path_factory.mktemp(f"rtx-{request.param}")
    record, current = {}, [None]
    build_engine = engine_builder.EngineBuilder.build

    def build_one(self, onnx_path, profile, plan_path, **kw):
        current[0] = plan_path.stem
        return build_engine(self, onnx_path, profile, plan_path, **kw)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(engine_builder, "import_trt", lambda flavour: _RecordingTRT(record, current))
        mp.setattr(engine_builder.EngineBuilder, "build", build_one)
        assert build.main(["--model", str(tiny_ckpt), "--target", "rtx4090", "--precision", request.param,
                           "--out", str(out), "--skip-parity"]) == 0
    RECORDS[str(out)] = record
    return out


def test_engines_built_and_recorded(rtx_build):
    manifest = json.loads((rtx_build / "manifest.json").read_text())
    assert manifest["stages"]["engines"]["status"] == "done"
    assert manifest["tensorrt"]["version"] == tensorrt_rtx.__version__
    for name in COMPONENTS:
        eng = manifest["components"][name]["engine"]
        plan = rtx_build / eng["plan"]
        assert eng["status"] == "complete" and plan.is_file() and plan.stat().st_size == eng["bytes"] > 100_000
        assert eng["flavour"] == "tensorrt-rtx" and eng["version"] == tensorrt_rtx.__version__
        assert eng["compute_capability"] == [8, 9]
        assert eng["profile"] == PROFILES[name]
        assert len(eng["key"]) == 64 and len(eng["plan_sha256"]) == 64


def test_engine_networks_and_profiles(rtx_build):
    """What TensorRT-RTX built each engine from: the I/O names, types and dynamic dims, the profile, and the
    precisions (BF16 build: every matrix multiply and convolution in BF16 but the timestep embedder's; softmax,
    normalizations and reductions in float32; fp32 build: everything float32)."""
    precision = json.loads((rtx_build / "manifest.json").read_text())["precision"]
    compute = {"fp32": "FLOAT", "bf16": "BF16"}[precision]
    record = RECORDS[str(rtx_build)]
    assert sorted(record) == sorted(COMPONENTS)
    for name in COMPONENTS:
        got = record[name]
        inputs, outputs = ({k: (compute if t == "compute" else t, dims) for k, (t, dims) in d.items()}
                           for d in IO[name])
        assert got["inputs"] == inputs and got["outputs"] == outputs, name
        assert got["profile"] == PROFILES[name], name
        matmuls = [la for la in got["layers"] if la[0] in ("MATRIX_MULTIPLY", "CONVOLUTION")]
        assert matmuls, name
        for kind, layer, types in got["layers"]:
            if kind in FLOAT32_LAYERS or precision == "fp32" or "t_embedder" in layer:
                assert types[0] == "FLOAT", (name, kind, layer, types)
            elif kind in ("MATRIX_MULTIPLY", "CONVOLUTION"):
                assert types[0] == "BF16", (name, kind, layer, types)


@pytest.mark.skipif(not _gpu_is((8, 9)), reason=NO_RTX_GPU)
def test_engines_deserialize_and_run(rtx_build, tiny_fp32):
    """On an SM89 GPU: the engines' image against the float32 graphs on ONNX Runtime, same prompt and seed (not run
    here: no GPU)."""
    from zimage_deploy.runtime.pipeline import Pipeline

    image = np.asarray(Pipeline(rtx_build, "tensorrt")("a cat", 128, 128, seed=0, progress=False)[0], float)
    ref = np.asarray(Pipeline(tiny_fp32, "onnxruntime")("a cat", 128, 128, seed=0, progress=False)[0], float)
    psnr = 10 * np.log10(255.0**2 / max(((image - ref) ** 2).mean(), 1e-12))
    print(f"tensorrt engines vs float32 graphs: {psnr:.1f} dB")
    assert image.shape == ref.shape and psnr >= 30.0  # BF16 on the Torch backend measures >= 40 dB


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


def test_datacenter_target_without_tensorrt(tiny_ckpt, tmp_path, capsys, monkeypatch):
    """Without TensorRT a datacenter build is one for the compiled Torch runtime: no engines (said in one line),
    the manifest says so, and `auto` picks the Torch backend."""
    from zimage_deploy.runtime.backends import resolve_backend

    monkeypatch.setitem(sys.modules, "tensorrt", None)  # as where TensorRT is not installed (CI: it is not)
    out = tmp_path / "out"
    assert build.main(["--model", str(tiny_ckpt), "--target", "h100", "--precision", "bf16", "--out", str(out),
                       "--skip-parity"]) == 0
    printed = capsys.readouterr()
    said = [line for line in (printed.out + printed.err).splitlines() if line.startswith("[engines]")]
    assert len(said) == 1 and "compiled Torch runtime" in said[0] and "tensorrt is not installed" in said[0]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["runtime"]["backend"] == "torch-compiled" and manifest["stages"]["engines"]["status"] == "skipped"
    assert not any(c.get("engine") for c in manifest["components"].values())
    assert resolve_backend("auto", manifest) == "torch"


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
