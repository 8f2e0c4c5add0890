"""The TensorRT backend and builder logic on the CPU, through the fake TensorRT of tests/fake_tensorrt.py: the real
runtime/tensorrt_backend.py and engines/builder.py code runs, the fake's engines run the build's float32 ONNX graphs
with ONNX Runtime at the addresses they are given, and every call that matters is recorded. The images are
compared with the ONNX Runtime backend's on the same build. (Real engines on a GPU: tests/test_engines.py.)"""

from __future__ import annotations

import json
import shutil
import warnings

import numpy as np
import pytest

import fake_tensorrt
from backend_conformance import BackendConformance
from zimage_deploy import build
from zimage_deploy.cli import run_cli
from zimage_deploy.errors import UserError


@pytest.fixture(scope="session")
def fake_builds(tmp_path_factory, tiny_ckpt, tiny_fp32):
    """Build folders made with the fake TensorRT-RTX (rtx4090, float32) over the CPU build's graphs (kept, not
    exported again): 'dynamic' and 'static' (64x64)."""
    trt = fake_tensorrt.make()
    root = tmp_path_factory.mktemp("fake-trt")
    argv = ["--model", str(tiny_ckpt), "--target", "rtx4090", "--precision", "fp32", "--skip-parity"]
    with pytest.MonkeyPatch.context() as mp:
        fake_tensorrt.install(mp, trt)
        shutil.copytree(tiny_fp32, root / "dynamic")
        assert build.main([*argv, "--out", str(root / "dynamic")]) == 0
        shutil.copytree(root / "dynamic", root / "static")
        assert build.main([*argv, "--out", str(root / "static"), "--static", "64x64"]) == 0
    assert not [c for c in trt.calls if c[0] == "parse_model_proto"]  # inline weights: parse_from_file
    return {"dynamic": root / "dynamic", "static": root / "static", "calls": trt.calls}


@pytest.fixture
def fake(monkeypatch):
    trt = fake_tensorrt.make()
    cuda = fake_tensorrt.install(monkeypatch, trt)
    return trt, cuda


def _copy(src, tmp_path, name="b"):
    shutil.copytree(src, tmp_path / name)
    return tmp_path / name


def _image(folder, backend, prompt="a cat", **kw):
    from zimage_deploy.runtime.pipeline import Pipeline

    pipe = backend if not isinstance(backend, str) else Pipeline(folder, backend, cfg_mode=kw.pop("cfg_mode", "batch"))
    return np.asarray(pipe(prompt, 64, 64, seed=kw.pop("seed", 0), steps=3, progress=False, **kw)[0], np.int16)


def _same(a, b):
    assert a.shape == b.shape and np.abs(a - b).max() <= 1, np.abs(a - b).max()


def _names(calls, kind):
    return [c[1] for c in calls if c[0] == kind]


# -- defects 1-3: static builds, CUDA graphs ------------------------------------------------------------------
def test_static_build_takes_any_caption_length(fake_builds, fake):
    """A --static build captures the transformer once and replays it for prompts of other lengths, with batch and
    sequential CFG (captions padded to the static length); the images are the ONNX Runtime backend's."""
    from zimage_deploy.runtime.pipeline import Pipeline

    trt, _ = fake
    folder = fake_builds["static"]
    builds = [c for c in fake_builds["calls"] if c[0] == "build" and c[1] == "transformer"]
    assert "REQUIRE_USER_ALLOCATION" in builds[-1][2]  # TensorRT-RTX captures only such engines
    seq = Pipeline(folder, "tensorrt", cfg_mode="sequential")
    for prompt, kw in (("a cat", {}), ("a very much longer prompt about a small red cat sitting on a green mat, "
                                       "drawn in ink with many careful strokes", {}),
                       ("a dog", {"guidance_scale": 3.0, "negative_prompt": "a long negative prompt " * 4})):
        _same(_image(folder, seq, prompt, **kw), _image(folder, "onnxruntime", prompt, **kw))
    captured = _names(trt.calls, "captured")  # the engines of one shape, each captured once, then replayed
    assert sorted(captured) == ["context_refiner", "transformer", "vae_decoder"], captured
    assert sum(c[0] == "replay" for c in trt.calls) >= 8


def test_captured_workspace_survives_a_larger_engine(fake_builds, fake, tmp_path):
    """The VAE decoder needs more device memory than the transformer whose graph was captured: the graph's
    workspace stays allocated to the backend (a replay into freed memory fails in the fake), and every context
    gets at least its engine's device memory size (set_device_memory's documented minimum)."""
    trt, _ = fake
    trt.scratch.update(text_encoder=1 << 12, context_refiner=1 << 12, transformer=1 << 14, vae_decoder=1 << 20)
    from zimage_deploy.runtime.pipeline import Pipeline

    pipe = Pipeline(fake_builds["static"], "tensorrt")
    first = _image(None, pipe)
    _same(_image(None, pipe), first)  # replays after the decoder ran
    assert not trt.violations, trt.violations


def test_capture_failure_runs_without_a_graph(fake_builds, fake):
    """A refused capture (here: engines built without REQUIRE_USER_ALLOCATION) is reported once per engine, and
    the engine runs without a graph from then on; the image is unchanged."""
    trt, _ = fake
    folder = fake_builds["static"]
    orig = trt.Runtime.deserialize_cuda_engine

    def without_flag(self, data):
        eng = orig(self, data)
        eng.flags.discard("REQUIRE_USER_ALLOCATION")
        return eng

    trt.Runtime.deserialize_cuda_engine = without_flag
    with pytest.warns(UserWarning, match="CUDA graph"):
        image = _image(folder, "tensorrt")
    _same(image, _image(folder, "onnxruntime"))
    refused = _names(trt.calls, "capture_refused")  # each engine of one shape tried once, not at every step
    assert sorted(refused) == ["context_refiner", "transformer", "vae_decoder"], refused
    assert "replay" not in [c[0] for c in trt.calls]


# -- defect 4 and #27.4: shapes within the profiles --------------------------------------------------------
def test_out_of_profile_shapes_refused(fake_builds, fake):
    import torch

    from zimage_deploy.runtime.tensorrt_backend import TensorRTBackend

    manifest = json.loads((fake_builds["dynamic"] / "manifest.json").read_text())
    backend = TensorRTBackend(fake_builds["dynamic"], manifest)
    with pytest.raises(UserError, match=r"vae_decoder: latents of shape \(1, 16, 72, 72\) is outside"):
        backend.run("vae_decoder", latents=torch.zeros(1, 16, 72, 72))  # 576 px: the profile ends at 512
    out = backend.run("vae_decoder", latents=torch.zeros(1, 16, 8, 8))["image"]
    assert tuple(out.shape) == (1, 3, 64, 64)


def test_unknown_output_shape_refused(fake_builds, fake):
    import torch

    from zimage_deploy.runtime.tensorrt_backend import TensorRTBackend

    trt, _ = fake
    manifest = json.loads((fake_builds["dynamic"] / "manifest.json").read_text())
    backend = TensorRTBackend(fake_builds["dynamic"], manifest)
    ctx = backend._engine("vae_decoder").context
    ctx.get_tensor_shape = lambda name: (-1, 3, -1, -1)
    with pytest.raises(RuntimeError, match="output image"):
        backend.run("vae_decoder", latents=torch.zeros(1, 16, 8, 8))


def _within(profile: dict, feeds: dict) -> list[str]:
    """The inputs (name, shape) that lie outside `profile` (component -> input -> [min, opt, max])."""
    bad, checked = [], 0
    for comp, inputs in profile.items():
        for name, (lo, _, hi) in inputs.items():
            if name in feeds and len(feeds[name]) == len(lo):
                checked += 1
                if not all(a <= s <= b for a, s, b in zip(lo, feeds[name], hi)):
                    bad.append(f"{comp}.{name} {tuple(feeds[name])} not in {lo}..{hi}")
    assert checked, "nothing checked"
    return bad


def _edit_feeds(facts, ckpt, prompt, sides, target, batch):
    """The shapes an Edit request's engines are given, built with the runtime's own sequence-layout code."""
    import torch

    from zimage_deploy.models.omni import batch_layouts, build_layout
    from zimage_deploy.runtime.omni import prompt_segments
    from zimage_deploy.runtime.prompt import PromptTokenizer

    ids, mask = PromptTokenizer(ckpt / "tokenizer").tokenize(prompt_segments(prompt, len(sides)))
    segments = [torch.zeros(int(n), facts["cap_feat_dim"]) for n in mask.sum(1)]
    conds = [torch.zeros(16, h // 8, w // 8) for h, w in sides]
    sig = [torch.zeros(1, facts["vision_max_patches"], facts["siglip_feat_dim"]) for _ in sides]
    lay = build_layout(segments, conds, sig, (target[0] // 8, target[1] // 8), facts["siglip_feat_dim"])
    feeds = {k: tuple(v.shape) for k, v in batch_layouts([lay] * batch).items()}
    feeds["latents"] = (batch, 16, target[0] // 8, target[1] // 8)
    feeds["image"] = (1, 3, *max(sides))  # the VAE encoder, one condition image at a time
    feeds["pixel_values"] = (1, facts["vision_max_patches"], facts["vision_patch_dim"])
    feeds["input_ids"] = tuple(ids.shape)
    return feeds


def test_edit_profiles_hold_the_worst_and_least_requests(edit_ckpt):
    """Every dim of the largest Edit request the validator accepts (longest prompt, most and largest condition
    images, CFG's batch, largest output) and of the smallest lies within the engine profiles (shown failing
    with the caption maximum two 32-token segments short)."""
    from zimage_deploy.engines.profiles import MAX_CONDITION_IMAGES, EngineOptions, profiles
    from zimage_deploy.facts import model_facts
    from zimage_deploy.runtime.validate import Limits, check_request
    from zimage_deploy.variants import get_variant

    facts = {**model_facts(edit_ckpt), "dim": 3840}  # real sizes' side range (512..2048 px)
    prof = profiles(get_variant("edit"), facts, EngineOptions())
    limits = Limits("edit", 16, 512, 2048, 8, 4.0, 1024, 1024)
    long_prompt = "word " * 1000
    k = MAX_CONDITION_IMAGES
    req = check_request(limits, long_prompt, images=[(2048, 2048)] * k, height=2048, width=2048)
    assert req.images == k
    worst = _edit_feeds(facts, edit_ckpt, long_prompt, [(2048, 2048)] * k, (2048, 2048), batch=2)
    assert not _within(prof, worst)
    check_request(limits, "a", images=[(512, 512)], height=512, width=512)
    least = _edit_feeds(facts, edit_ckpt, "a", [(512, 512)], (512, 512), batch=1)
    assert not _within(prof, least)


def test_controlnet_profiles_hold_the_worst_request():
    import torch

    from zimage_deploy.engines.profiles import EngineOptions, profiles
    from zimage_deploy.models.omni import pad32
    from zimage_deploy.runtime.prompt import pad_captions
    from zimage_deploy.variants import get_variant

    facts = dict(dim=3840, cap_feat_dim=2560, latent_channels=16, vae_scale_factor=8, patch_size=2, n_hints=15,
                 control_in_dim=33)
    prof = profiles(get_variant("turbo"), facts, EngineOptions())
    assert "controlnet" in prof
    for side, batch, tokens in ((2048, 4, 512), (512, 1, 1)):
        feats, lens = pad_captions([torch.zeros(tokens, 8)] * batch)
        h = side // 8
        feeds = {"latents": (batch, 16, h, h), "cap_states": (batch, feats.shape[1], 3840), "cap_lens": (batch,),
                 "control": (batch, 33, h, h), "hints": (15, batch, pad32((h // 2) ** 2) + feats.shape[1], 3840)}
        assert not _within(prof, feeds)


def test_edit_condition_images_outside_the_profile_refused():
    """The Edit condition images go through the VAE encoder's profile one by one: both prepared sides must lie
    in the build's side range (it was checked by area only: 256x256 and 2800x352 passed)."""
    from zimage_deploy.errors import RequestError
    from zimage_deploy.runtime.validate import Limits, check_request

    limits = Limits("edit", 16, 512, 2048, 8, 4.0, 1024, 1024)
    for size in ((256, 256), (2800, 352), (352, 2800)):
        with pytest.raises(RequestError, match="condition image 0"):
            check_request(limits, "x", images=[size], height=1024, width=1024)
    check_request(limits, "x", images=[(512, 2048)], height=1024, width=1024)


# -- defects 5-8: loading ----------------------------------------------------------------------------------
def _backend(folder, **kw):
    from zimage_deploy.runtime.tensorrt_backend import TensorRTBackend

    return TensorRTBackend(folder, json.loads((folder / "manifest.json").read_text()), **kw)


def test_engines_load_in_manifest_order_and_streams_wait(fake_builds, fake):
    """All engines load at start, in the manifest's order; every run makes the engine stream wait for the
    caller's stream before TensorRT works and the caller's stream wait for it before the outputs are used."""
    trt, cuda = fake
    backend = _backend(fake_builds["dynamic"])
    assert _names(trt.calls, "deserialize") == ["text_encoder", "context_refiner", "transformer", "vae_decoder",
                                                "vae_encoder"]
    run = backend.run

    def marked(component, **inputs):
        trt.calls.append(("run_start", component))
        out = run(component, **inputs)
        trt.calls.append(("run_end", component))
        return out

    backend.run = marked
    from zimage_deploy.runtime.pipeline import Pipeline

    _image(None, Pipeline(fake_builds["dynamic"], backend))
    trt_stream, caller = backend.stream.cuda_stream, cuda.default.cuda_stream
    runs = 0
    for i, c in enumerate(trt.calls):
        if c[0] != "run_start":
            continue
        runs += 1
        end = trt.calls.index(("run_end", c[1]), i)
        span = trt.calls[i:end]
        first = next(j for j, x in enumerate(span) if x[0] == "execute")
        last = max(j for j, x in enumerate(span) if x[0] == "execute")
        assert ("wait_stream", trt_stream, caller) in span[:first], span
        assert ("wait_stream", caller, trt_stream) in span[last:], span
    assert runs >= 5


def test_low_vram_synchronizes_and_swaps_weights(fake_builds, fake):
    """Low-VRAM mode: one stage resident; before weights are dropped the engine stream is synchronized; the
    engines stay deserialized (their contexts and compiled kernels too): weights are unloaded and loaded again."""
    trt, _ = fake
    backend = _backend(fake_builds["dynamic"], low_vram=True)
    from zimage_deploy.runtime.pipeline import Pipeline

    pipe = Pipeline(fake_builds["dynamic"], backend)
    _same(_image(None, pipe), _image(fake_builds["dynamic"], "onnxruntime"))
    _image(None, pipe)
    calls = trt.calls
    drops = [i for i, c in enumerate(calls) if c[0] in ("unload_weights", "engine_freed")]
    assert drops
    for i in drops:
        last_exec = max(j for j in range(i) if calls[j][0] == "execute")
        assert ("synchronize", backend.stream.cuda_stream) in calls[last_exec:i], calls[last_exec:i + 1]
    assert "engine_freed" not in [c[0] for c in calls]
    assert _names(calls, "deserialize").count("transformer") == 1
    assert "load_weights" in [c[0] for c in calls]


def _one_stage_at_a_time(calls) -> list[str]:
    """Replay the engine calls: at every weight load and every run, the GPU holds only engines of the stage it
    serves (components.py stage_of) -> the order engines' weights loaded in."""
    from zimage_deploy.components import stage_of

    resident, loads = set(), []
    for c in calls:
        if c[0] == "load_weights" or c[:3:2] == ("deserialize", "loaded"):
            assert {stage_of(n) for n in resident} <= {stage_of(c[1])}, (c, resident)
            resident.add(c[1])
            loads.append(c[1])
        elif c[0] in ("unload_weights", "engine_freed"):
            resident.discard(c[1])
        elif c[0] == "execute":
            assert {stage_of(n) for n in resident} == {stage_of(c[1])}, (c, resident)
    return loads


def test_low_vram_one_stage_resident(fake_builds, fake):
    """Low-VRAM mode over two images: one stage's engines on the GPU at a time, the text encoder's weights
    released before the DiT's load (and so on down the pipeline)."""
    trt, _ = fake
    from zimage_deploy.runtime.pipeline import Pipeline

    pipe = Pipeline(fake_builds["dynamic"], "tensorrt", low_vram=True)
    _image(None, pipe)
    _image(None, pipe, prompt="a dog")
    loads = _one_stage_at_a_time(trt.calls)
    assert loads[:3] == ["text_encoder", "context_refiner", "transformer"] and loads.count("text_encoder") == 2


def test_text_encoder_cpu_never_loads_its_engine(fake_builds, fake):
    """text-encoder-cpu: the text encoder runs on the CPU through the Torch backend (its engine is never read);
    the other engines one stage at a time; the image the ONNX Runtime backend's within the usual rounding."""
    trt, _ = fake
    from zimage_deploy.runtime.pipeline import Pipeline

    pipe = Pipeline(fake_builds["dynamic"], "tensorrt", offload="text-encoder-cpu")
    host = pipe.backend.host["text_encoder"]
    assert pipe.backend.low_vram and host.name == "torch" and host.device.type == "cpu"
    _same(_image(None, pipe), _image(fake_builds["dynamic"], "onnxruntime"))
    assert "text_encoder" not in _names(trt.calls, "deserialize") + _names(trt.calls, "execute")
    assert "text_encoder" not in pipe.backend.engines
    assert all(p.device.type == "cpu" for p in host.models["text_encoder"].parameters())
    assert _one_stage_at_a_time(trt.calls)[0] == "context_refiner"
    with pytest.raises(UserError, match="cannot run offload mode sequential"):
        Pipeline(fake_builds["dynamic"], "tensorrt", offload="sequential")


def test_weight_streaming_budget_from_the_plan(fake_builds, fake, tmp_path):
    trt, _ = fake
    folder = _copy(fake_builds["dynamic"], tmp_path)
    manifest = json.loads((folder / "manifest.json").read_text())
    eng = manifest["components"]["transformer"]["engine"]
    plan = json.loads((folder / eng["plan"]).read_bytes())
    plan["flags"].append("WEIGHT_STREAMING")  # as a --weight-streaming build makes it
    (folder / eng["plan"]).write_bytes(json.dumps(plan).encode())
    from zimage_deploy.hashing import file_sha256

    eng.update(bytes=(folder / eng["plan"]).stat().st_size, plan_sha256=file_sha256(folder / eng["plan"]))
    manifest["runtime"] = {"mode": "weight-streaming", "stream_budget_bytes": {"transformer": 300_000}}
    (folder / "manifest.json").write_text(json.dumps(manifest))
    _backend(folder)._engine("transformer")
    assert ("weight_streaming_budget", "transformer", 300_000) in trt.calls


def test_runtime_cache_written_once_and_reused(fake_builds, fake, tmp_path):
    trt, _ = fake
    folder = _copy(fake_builds["dynamic"], tmp_path)
    for old in folder.rglob("*.runtime-cache"):  # left by other tests' backends
        old.unlink()
    _backend(folder)
    first = [c for c in trt.calls if c[0] == "create_context"]
    assert first and all(c[3] == "jit" for c in first)
    caches = sorted(folder.rglob("*.runtime-cache"))
    assert len(caches) == 5
    stamps = [p.stat().st_mtime_ns for p in caches]
    del trt.calls[:]
    _backend(folder)
    again = [c for c in trt.calls if c[0] == "create_context"]
    assert len(again) == 5 and all(c[3] == "cached" for c in again)
    assert [p.stat().st_mtime_ns for p in caches] == stamps  # not written again


def test_weightless_engine_refitted_from_mapped_external_data(tiny_ckpt, fake, tmp_path, monkeypatch):
    """A weightless build of graphs with external data is refitted at load from a memory map of the data file
    (load_initializer), not by reading the graph with refit_from_file; the image is the graphs'."""
    from zimage_deploy.engines import builder
    from zimage_deploy.export import weights

    trt, _ = fake
    monkeypatch.setattr(weights, "EXTERNAL_THRESHOLD", 0)  # every graph's weights in model.onnx.data
    monkeypatch.setattr(builder, "device_capability", lambda: (8, 9))  # a GPU at build time: strips
    out = tmp_path / "w"
    assert build.main(["--model", str(tiny_ckpt), "--target", "rtx4090", "--precision", "fp32", "--skip-parity",
                       "--strip-weights", "on", "--out", str(out)]) == 0
    assert "parse_model_proto" in [c[0] for c in trt.calls]  # built from the mapped data too
    del trt.calls[:]
    _same(_image(out, "tensorrt"), _image(out, "onnxruntime"))
    assert "refit_from_file" not in [c[0] for c in trt.calls]
    refits = [c for c in trt.calls if c[0] == "refit_model_proto"]
    assert {c[1] for c in refits} == {"text_encoder", "context_refiner", "transformer", "vae_decoder", "vae_encoder"}
    assert all(c[2] > 0 and not c[3] for c in refits)  # every external initializer mapped


# -- defects 10-14: the datacenter flavour -----------------------------------------------------------------
@pytest.mark.parametrize("version,legacy", [("10.12.0.36", True), ("10.8.0.43", False)])
def test_tensorrt_before_10_13_refused_up_front(tiny_ckpt, tmp_path, capsys, monkeypatch, version, legacy):
    trt = fake_tensorrt.make("tensorrt", version, legacy=legacy)
    fake_tensorrt.install(monkeypatch, trt, gpu=(9, 0), gpu_name="NVIDIA H800")
    from zimage_deploy.engines import builder

    monkeypatch.setattr(builder, "device_capability", lambda: (9, 0))
    out = tmp_path / "out"
    code = run_cli(lambda: build.main(["--model", str(tiny_ckpt), "--target", "h800", "--precision", "bf16",
                                       "--out", str(out)]))
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("error:"), err
    assert "10.13" in err[0] and version in err[0] and "pip install" in err[0]
    assert not out.exists()  # refused before the export


def _datacenter(monkeypatch, version="10.13.3.9", gpu_name="NVIDIA H100 80GB HBM3"):
    import torch

    from zimage_deploy.engines import builder

    trt = fake_tensorrt.make("tensorrt", version)
    fake_tensorrt.install(monkeypatch, trt, gpu=(9, 0), gpu_name=gpu_name)
    monkeypatch.setattr(builder, "device_capability", lambda: (9, 0))
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: trt.calls.append(("empty_cache",)))
    return trt


def test_datacenter_build_records_version_sm_and_gpu(fake_builds, tiny_ckpt, tmp_path, monkeypatch):
    """TensorRT 10.13+: the build runs; the manifest records the version, SM and GPU model; the torch memory of
    the build is released before the engines are built; the default keeps the weights in the plans (the tested
    path); the timing cache is per GPU model. Loaded on another model (an H800): a warning says so."""
    trt = _datacenter(monkeypatch)
    out = _copy(fake_builds["dynamic"], tmp_path)  # its graphs are kept: only the engines are built
    assert build.main(["--model", str(tiny_ckpt), "--target", "h100", "--precision", "fp32", "--skip-parity",
                       "--out", str(out)]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["tensorrt"]["version"] == "10.13.3.9"
    for comp in manifest["components"].values():
        eng = comp["engine"]
        assert eng["version"] == "10.13.3.9" and eng["compute_capability"] == [9, 0]
        assert eng["gpu"] == "NVIDIA H100 80GB HBM3" and eng["stripped"] is False
        assert "H100" in eng["timing_cache"]
    kinds = [c[0] for c in trt.calls]
    assert "empty_cache" in kinds and kinds.index("empty_cache") < kinds.index("build")
    assert ("set_timing_cache", False) in trt.calls

    _same(_image(out, "tensorrt"), _image(out, "onnxruntime"))
    fake_tensorrt.install(monkeypatch, trt, gpu=(9, 0), gpu_name="NVIDIA H800")
    with pytest.warns(UserWarning, match="built on a NVIDIA H100 80GB HBM3.*NVIDIA H800"):
        _backend(out)


def test_refittable_refused_on_tensorrt_11_3(tiny_ckpt, tmp_path, monkeypatch, capsys):
    _datacenter(monkeypatch, "11.3.0.10")
    code = run_cli(lambda: build.main(["--model", str(tiny_ckpt), "--target", "h100", "--refittable",
                                       "--out", str(tmp_path / "x")]))
    assert code == 2 and "GEMM bias" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_fp8_attention_on_hopper_refused(tiny_ckpt, tmp_path, monkeypatch, capsys):
    _datacenter(monkeypatch)
    code = run_cli(lambda: build.main(["--model", str(tiny_ckpt), "--target", "h100", "--precision", "fp8",
                                       "--fp8-attention", "--out", str(tmp_path / "x")]))
    assert code == 2 and "SM90" in capsys.readouterr().err


class TestTensorRTConformance(BackendConformance):
    """The conformance rules (tests/backend_conformance.py) on engines of the fake TensorRT-RTX (they run the
    graphs with ONNX Runtime: what is checked is the backend's bindings, shapes, batching and refusals). Run-time
    LoRAs: these engines are not refittable (refittable ones need a GPU to build: test_lora.py::test_refit_on_gpu),
    so the rule checked here is the refusal."""

    backend = "tensorrt"

    @pytest.fixture
    def build(self, fake_builds, fake):
        return fake_builds["dynamic"]
