"""The Torch backend's memory modes (runtime/offload.py): the same images bit for bit as all resident, and the
bookkeeping of which modules are on the device at each stage.

On the CPU the meta device stands in for "not on the GPU": a released module's tensors hold no data, so a
module the policy failed to bring in makes the run fail, and a wrong copy changes the image. What only a GPU can
show: the real CUDA peak (torch.cuda.max_memory_allocated) and the copy times; the last test measures the peak
where CUDA is present."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from zimage_deploy.errors import UserError
from zimage_deploy.runtime.backends import TorchBackend
from zimage_deploy.runtime.offload import OffloadPolicy, offload_policy
from zimage_deploy.runtime.pipeline import Pipeline


class Recording(OffloadPolicy):
    """Notes, at each stage, where every managed module's tensors are (device types)."""

    def __init__(self, mode):
        super().__init__(mode, "cpu", park="meta")
        self.seen = []

    def stage(self, key):
        policy = super().stage(key)
        outer = self

        class Noting:
            def __enter__(self):
                policy.__enter__()
                outer.seen.append((key, {k: outer.where(k) for k in outer.stages}, outer.resident))

            def __exit__(self, *exc):
                return policy.__exit__(*exc)

        return Noting()


def _images(build, offload):
    backend = TorchBackend(build, Pipeline(build, "torch").manifest, device="cpu", offload=offload)
    pipe = Pipeline(build, backend)
    images = pipe(["a cat", "a dog"], 64, 64, 2, 0, progress=False)
    return [np.asarray(im) for im in images], backend


@pytest.fixture(scope="module")
def reference(tiny_bf16):
    return _images(tiny_bf16, "none")[0]


def test_model_offload_one_stage_at_a_time(tiny_bf16, reference):
    """Bit for bit the all-resident images; at each stage only its own module is on the device, the text encoder
    released before the DiT loads; the peak is the largest stage's weights, not their sum."""
    policy = Recording("model")
    images, backend = _images(tiny_bf16, policy)
    assert all((a == b).all() for a, b in zip(images, reference))
    for key, where, _ in policy.seen:
        assert where[key] == {"cpu"}  # the stage's module: on the "device"
        assert all(w == {"meta"} for k, w in where.items() if k != key)  # every other one: released
    te = policy.events.index(("load", "text_encoder"))
    assert policy.events[te + 1:te + 3] == [("release", "text_encoder"), ("load", "transformer")]
    sizes = {k: sum(backend.offload.masters[(id(o), n)].numel() * backend.offload.masters[(id(o), n)].element_size()
                    for o, n, _ in slots) for k, slots in policy.stages.items()}
    assert policy.peak == max(sizes.values()) < sum(sizes.values())


def test_sequential_offload_streams_leaf_by_leaf(tiny_bf16, reference):
    """Bit for bit again; between calls nothing stays on the device, and the peak is at most one leaf module's
    weights plus the stage's non-leaf tensors (pad tokens, ...), less than the largest module."""
    policy = Recording("sequential")
    images, backend = _images(tiny_bf16, policy)
    assert all((a == b).all() for a, b in zip(images, reference))
    assert policy.resident == 0 and all(w == {"meta"} for w in map(policy.where, policy.stages))
    size = lambda t: t.numel() * t.element_size()  # noqa: E731
    bound = 0
    for model in backend.models.values():
        leaves = [m for m in model.modules() if not any(True for _ in m.children())]
        inner = sum(size(t) for m in model.modules() if m not in leaves
                    for t in [*m._parameters.values(), *m._buffers.values()] if t is not None)
        bound = max(bound, inner + max(sum(size(p) for p in m.parameters()) for m in leaves))
    largest = max(sum(size(p) for p in m.parameters()) for m in backend.models.values())
    assert 0 < policy.peak <= bound < largest


def _nbytes(module) -> int:
    return sum(t.numel() * t.element_size() for t in [*module.parameters(), *module.buffers()])


def test_text_encoder_cpu_runs_it_on_the_host(tiny_bf16, reference):
    """text-encoder-cpu: bit for bit the all-resident images (the CPU is the device here: the same kernels); the
    text encoder's tensors never reach the device (its module keeps its own host tensors, it is never loaded, its
    bytes never counted resident) while the other stages go one at a time as in model mode; the peak is the
    largest other stage's weights, as plan.py counts the mode."""
    policy = Recording("text-encoder-cpu")
    text_encoder = []
    images, backend = _images(tiny_bf16, policy)
    assert all((a == b).all() for a, b in zip(images, reference))
    host = backend.models["text_encoder"]
    assert ("load", "text_encoder") not in policy.events and ("release", "text_encoder") not in policy.events
    assert not any((id(o), n) in policy.masters for o, n, _ in policy.stages["text_encoder"])
    assert all(p.device.type == "cpu" for p in host.parameters())
    assert backend.offload.device_of("text_encoder").type == "cpu"
    for key, where, resident in policy.seen:
        assert where["text_encoder"] == {"cpu"}  # on the host, always (never parked on meta, never copied)
        if key == "text_encoder":
            text_encoder.append(resident)
            continue
        assert where[key] == {"cpu"}
        assert all(w == {"meta"} for k, w in where.items() if k not in (key, "text_encoder"))
    assert text_encoder == [0]  # the first stage: nothing on the device while the text encoder runs
    assert policy.events[0] == ("load", "transformer")
    others = {k: _nbytes(m) for k, m in backend.models.items() if k != "text_encoder"}
    assert policy.peak == max(others.values())


def test_offload_modes_and_the_plan(tiny_bf16):
    from zimage_deploy import manifest as manifest_io
    from zimage_deploy.runtime.backends import make_backend

    manifest = manifest_io.load(tiny_bf16)
    assert make_backend("torch", tiny_bf16, manifest, low_vram=True).offload.mode == "model"  # --low-vram
    assert make_backend("torch", tiny_bf16, {**manifest, "runtime": {"mode": "low-vram"}}).offload.mode == "none"
    assert offload_policy(None, {"runtime": {"mode": "low-vram"}}, torch.device("cuda"), False).mode == "model"
    assert offload_policy(None, {"runtime": {"mode": "weight-streaming"}}, torch.device("cuda"), False).mode == \
        "sequential"
    assert offload_policy(None, {"runtime": {"mode": "low-vram"}}, torch.device("cpu"), False).mode == "none"  # CPU
    assert offload_policy(None, {"runtime": {"mode": "low-vram"}}, torch.device("cuda"), True).mode == "none"
    with pytest.raises(UserError, match="does not combine with --compile"):
        offload_policy("model", {}, torch.device("cuda"), True)
    with pytest.raises(UserError, match="unknown offload mode"):
        OffloadPolicy("disk")
    planned = {"runtime": {"mode": "text-encoder-cpu"}}
    assert offload_policy(None, planned, torch.device("cuda"), False).mode == "text-encoder-cpu"
    assert offload_policy("auto", planned, torch.device("cuda"), False).mode == "text-encoder-cpu"
    assert make_backend("torch", tiny_bf16, manifest, offload="text-encoder-cpu").offload.mode == "text-encoder-cpu"


def test_offload_names_and_what_each_backend_runs(tiny_fp32):
    """--offload: auto is the plan's (None); --low-vram is model and must agree; the TensorRT runtime runs model
    and text-encoder-cpu as low-VRAM mode (the latter with the text encoder on the CPU), weight streaming only as
    the build planned it; ONNX Runtime (CPU) only none."""
    from zimage_deploy import manifest as manifest_io
    from zimage_deploy.runtime.backends import make_backend
    from zimage_deploy.runtime.offload import asked_mode, tensorrt_mode

    assert asked_mode("auto") is None and asked_mode(None, True) == "model" and asked_mode("none", False) == "none"
    with pytest.raises(UserError, match="give one of them"):
        asked_mode("sequential", True)
    with pytest.raises(UserError, match="unknown offload mode"):
        asked_mode("disk")
    plan = lambda mode: {"runtime": {"mode": mode}}  # noqa: E731
    assert tensorrt_mode(None, plan("all-resident")) == (False, False)
    assert tensorrt_mode(None, plan("low-vram")) == (True, False)
    assert tensorrt_mode(None, plan("text-encoder-cpu")) == (True, True)
    assert tensorrt_mode(None, plan("weight-streaming")) == (True, False)
    assert tensorrt_mode("none", plan("text-encoder-cpu")) == (False, False)
    assert tensorrt_mode("text-encoder-cpu", plan("all-resident")) == (True, True)
    assert tensorrt_mode("sequential", plan("weight-streaming")) == (True, False)
    with pytest.raises(UserError, match="cannot run offload mode sequential.*--weight-streaming"):
        tensorrt_mode("sequential", plan("low-vram"))
    manifest = manifest_io.load(tiny_fp32)
    assert make_backend("onnxruntime", tiny_fp32, manifest, offload="auto").name == "onnxruntime"
    with pytest.raises(UserError, match="onnxruntime backend runs on the CPU: offload mode model"):
        make_backend("onnxruntime", tiny_fp32, manifest, offload="model")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the CUDA peak needs a GPU")
def test_cuda_peak_memory(tiny_bf16):  # not run here (no GPU): the real peak of each mode
    peaks = {}
    for mode in ("none", "model", "text-encoder-cpu", "sequential"):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        backend = TorchBackend(tiny_bf16, Pipeline(tiny_bf16, "torch").manifest, device="cuda", offload=mode)
        Pipeline(tiny_bf16, backend)(["a cat"], 64, 64, 2, 0, progress=False)
        peaks[mode] = torch.cuda.max_memory_allocated()
        del backend
    assert peaks["sequential"] < peaks["model"] < peaks["none"]
    assert peaks["text-encoder-cpu"] <= peaks["model"]  # the text encoder's weights and work stay on the host
