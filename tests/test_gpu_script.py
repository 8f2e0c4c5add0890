"""The GPU benchmark and the Torch fast paths, on the CPU: every row of benchmarks/gpu_turbo_1024.py in its reduced
mode, benchmarks/gpu_run.sh's plumbing (wheels, outer timeout, table), dense attention against the masked one, the
per-step graph wrapper's static buffers, FP8 static scales and fast accumulation, dynamo's counters, the compile
fallback, and the CUDA-synchronised stage timer. What needs a GPU (CUDA-graph capture, flash kernels, FP8 GEMMs,
speed) is owed to a GPU session: see README, Benchmarks."""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from zimage_deploy.models import fast
from zimage_deploy.models.dit import Attention, Block
from zimage_deploy.models.load import load_dit
from zimage_deploy.runtime import torch_fast
from zimage_deploy.runtime.backends import TorchBackend
from zimage_deploy.runtime.pipeline import Pipeline, timed

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_turbo_1024.py"
QUICK = ["--reduced", "--device", "cpu", "--repeats", "1", "--size", "64", "--steps", "2",
         "--compile-backend", "eager"]


def _script():
    spec = importlib.util.spec_from_file_location("gpu_turbo_1024", SCRIPT)
    module = sys.modules.get(spec.name)
    if module is None:
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module  # dataclasses look their module up
        spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def reduced(tmp_path_factory):
    """The script's reduced configs: diffusers' modules with random weights, ours with the same weights, a build
    folder for the runtime."""
    g = _script()
    pipe = g.build_diffusers(g.REDUCED, "cpu", torch.float32)
    out = tmp_path_factory.mktemp("reduced")
    modules = g.build_ours(pipe, g.REDUCED, "cpu", torch.float32, out)
    from zimage_deploy import manifest as manifest_io

    return out, manifest_io.load(out), modules


def _dit_inputs(dit, cap_len: int, seq: int, batch: int = 1, seed: int = 0):
    """(latents, timestep, cap_states, cap_lens) for a per-step call."""
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, 16, 8, 8, generator=g), torch.full((batch,), 0.4),
            torch.randn(batch, seq, dit.cfg.dim, generator=g), torch.full((batch,), cap_len))


def _feats(dit, seq: int, seed: int = 0):
    return torch.randn(1, seq, dit.cfg.cap_feat_dim, generator=torch.Generator().manual_seed(seed))


# -- dense attention --------------------------------------------------------------------------------------------
def test_dense_attention_equals_the_masked_one_when_every_key_is_valid(tiny_ckpt):
    dit = load_dit(tiny_ckpt)
    latents, t, states, lens = _dit_inputs(dit, 40, 64)  # 40 tokens pad to 64: every caption key is valid
    assert torch_fast.dense_captions(lens, 64)
    with torch.no_grad():
        feats = _feats(dit, 64)
        masked = dit(latents, t, states, lens), dit.context(feats, lens)
        assert fast.set_dense_attention(dit, True) == 2 * dit.cfg.n_refiner_layers + dit.cfg.n_layers
        dense = dit(latents, t, states, lens), dit.context(feats, lens)
    for a, b in zip(masked, dense):
        assert ((a - b).norm() / a.norm()).item() < 1e-5


def test_dense_attention_differs_where_keys_are_masked(tiny_ckpt):
    """Negative control: with caption slots beyond the padded length the mask matters, and the runtime's rule
    keeps it."""
    dit = load_dit(tiny_ckpt)
    latents, t, states, lens = _dit_inputs(dit, 40, 96)  # 64 attended, 32 masked
    assert not torch_fast.dense_captions(lens, 96)
    with torch.no_grad():
        masked = dit(latents, t, states, lens)
        fast.set_dense_attention(dit, True)
        dense = dit(latents, t, states, lens)
    assert ((masked - dense).norm() / masked.norm()).item() > 1e-3


@pytest.mark.parametrize("lens,seq,expected", [([40], 64, True), ([33, 64], 64, True), ([40, 70], 96, False),
                                               ([1], 32, True), ([32], 64, False)])
def test_dense_captions_rule(lens, seq, expected):
    assert torch_fast.dense_captions(torch.tensor(lens), seq) is expected


def test_dense_captions_never_reads_a_device_tensor():
    assert torch_fast.dense_captions(torch.tensor([40], device="meta"), 64) is False


def test_export_ignores_the_dense_flag(tiny_ckpt):
    """A traced graph keeps the mask even with the flag set (what export sees)."""
    dit = load_dit(tiny_ckpt)
    latents, t, states, lens = _dit_inputs(dit, 40, 96)
    with torch.no_grad():
        masked = dit(latents, t, states, lens)
        fast.set_dense_attention(dit, True)
        traced = torch.jit.trace(dit, (latents, t, states, lens), check_trace=False)
        out = traced(latents, t, states, lens)
    assert ((masked - out).norm() / masked.norm()).item() < 1e-5


# -- the backend ------------------------------------------------------------------------------------------------
def _images(build, manifest, modules, backend, prompts, steps=2):
    pipe = Pipeline(build, backend)
    return [np.asarray(im).astype(np.int16) for im in pipe(prompts, 64, 64, steps, 0, progress=False)]


def test_unbucketed_compiled_mode_matches_eager_and_drops_the_mask_at_batch_1(reduced, monkeypatch):
    build, manifest, modules = reduced
    torch_fast.reset_compile_counters()  # another test's compiled kernel choice does not carry over
    reference = _images(build, manifest, modules, TorchBackend(build, manifest, device="cpu", torch_mode="eager",
                                                               modules=modules), ["a cat"])
    decisions = []
    original = TorchBackend._set_dense
    monkeypatch.setattr(TorchBackend, "_set_dense",
                        lambda self, dense: (decisions.append(dense), original(self, dense)))
    backend = TorchBackend(build, manifest, device="cpu", torch_mode="compiled", compile_backend="eager",
                           caption_buckets=None, modules=modules)  # exact caption lengths: dense at batch 1
    got = _images(build, manifest, modules, backend, ["a cat"])
    assert np.abs(got[0] - reference[0]).max() <= 1
    assert decisions == [True] * 3  # context + 2 steps, batch 1: unmasked
    assert backend.fallbacks() == {}
    assert backend.graph_stats()["replays"] == 2 and backend.graph_stats()["captured"] == 0
    # the caller's modules were not changed: no compiled regions, no dense flags
    assert all(getattr(m, "_compiled_call_impl", None) is None for k in modules for m in modules[k].modules())
    assert not any(m.dense for m in modules["transformer"].modules() if isinstance(m, Attention))


def test_cudnn_attention_kernel_is_first_in_the_dit_only(reduced, monkeypatch):
    """attention_kernel="cudnn": SDPA's kernel order starts with cuDNN inside every DiT call (where compiled blocks
    are traced and step graphs captured), the default order elsewhere and afterwards; the image is unchanged."""
    from torch.nn.attention import SDPBackend

    from zimage_deploy.models import dit, layers

    build, manifest, modules = reduced
    reference = _images(build, manifest, modules, TorchBackend(build, manifest, device="cpu", modules=modules),
                        ["a cat"])
    default_order = torch._C._get_sdp_priority_order()
    seen = {"dit": [], "other": []}

    def recorder(fn, where):
        return lambda *a, **k: (seen[where].append(torch._C._get_sdp_priority_order()[0]), fn(*a, **k))[1]

    monkeypatch.setattr(dit, "attention", recorder(dit.attention, "dit"))  # the DiT's attention only
    monkeypatch.setattr(layers, "attention", recorder(layers.attention, "other"))  # text encoder, VAE
    for module in ("text_encoder", "vae"):
        monkeypatch.setattr(f"zimage_deploy.models.{module}.attention", recorder(layers.attention, "other"))
    torch_fast.reset_compile_counters()
    backend = TorchBackend(build, manifest, device="cpu", torch_mode="compiled", attention_kernel="cudnn",
                           compile_backend="eager", modules=modules)
    got = _images(build, manifest, modules, backend, ["a cat"])
    assert np.abs(got[0] - reference[0]).max() <= 1
    assert seen["dit"] and set(seen["dit"]) == {int(SDPBackend.CUDNN_ATTENTION)}, seen
    assert seen["other"] and set(seen["other"]) == {default_order[0]}, seen
    assert torch._C._get_sdp_priority_order() == default_order
    torch_fast.reset_compile_counters()


def test_compiled_backends_of_two_attention_kernels_need_a_reset(reduced):
    """Compiled code keeps the kernel order it was traced with and is shared in the process: a compiled backend
    with another kernel is refused (a clear error, not a silently wrong kernel) until the compiled code is reset;
    eager backends take any kernel."""
    from zimage_deploy.errors import UserError

    build, manifest, modules = reduced
    torch_fast.reset_compile_counters()
    make = lambda mode, kernel: TorchBackend(  # noqa: E731
        build, manifest, device="cpu", torch_mode=mode, attention_kernel=kernel, compile_backend="eager",
        modules=modules)
    make("compiled", "cudnn").model("transformer")
    make("compiled", "cudnn").model("transformer")  # the same kernel: fine
    make("eager", "default").model("transformer")  # eager: nothing compiled
    with pytest.raises(UserError, match="reset_compile_counters"):
        make("compiled", "default").model("transformer")
    torch_fast.reset_compile_counters()
    make("compiled", "default").model("transformer")
    torch_fast.reset_compile_counters()


def test_mixed_caption_lengths_keep_the_mask(reduced, monkeypatch):
    build, manifest, modules = reduced
    decisions = []
    original = TorchBackend._set_dense
    monkeypatch.setattr(TorchBackend, "_set_dense",
                        lambda self, dense: (decisions.append(dense), original(self, dense)))
    prompts = ["a cat", "a very long prompt about a cat on a windowsill in the afternoon light, with many words " * 3]
    backend = TorchBackend(build, manifest, device="cpu", torch_mode="eager", modules=modules)
    got = _images(build, manifest, modules, backend, prompts)
    assert decisions == [False] * 3
    reference = _images(build, manifest, modules, TorchBackend(build, manifest, device="cpu", torch_mode="eager",
                                                               dense_attention=False, modules=modules), prompts)
    assert max(np.abs(a - b).max() for a, b in zip(got, reference)) <= 1


def test_unknown_mode_is_refused(reduced):
    from zimage_deploy.errors import UserError

    build, manifest, modules = reduced
    with pytest.raises(UserError, match="torch_mode must be one of"):
        TorchBackend(build, manifest, device="cpu", torch_mode="graphs", modules=modules)
    with pytest.raises(UserError, match="attention_kernel must be one of"):
        TorchBackend(build, manifest, device="cpu", attention_kernel="flash3", modules=modules)


def test_sync_audit_ignores_the_debug_modes_own_notice():
    """The first audited row caught sync debug mode's prototype notice and counted it as a host sync (H100 and
    H200 runs of 2026-11-27): the notice is not a sync, a real sync warning is."""
    g = _script()
    notice = ("Synchronization debug mode is a prototype feature and does not yet detect all synchronizing "
              "operations (Triggered internally at /pytorch/torch/csrc/cuda/Module.cpp:1)")
    real = "called a synchronizing CUDA operation (Triggered internally at /pytorch/c10/cuda/CUDAFunctions.cpp:1)"
    assert g.sync_warnings([notice, "some other warning"]) == []
    assert g.sync_warnings([notice, real]) == [real]


def test_default_rows_fit_one_device_call():
    """A device call brings back 8 files: the default rows' images plus the report and the log must fit."""
    g = _script()
    assert len(g.DEFAULT_ROWS) + 2 <= 8 and g.DEFAULT_ROWS[0] == "diffusers"
    assert set(g.DEFAULT_ROWS) <= set(g.ROWS)


# -- the per-step graph wrapper ---------------------------------------------------------------------------------
def test_step_graph_static_buffers(tiny_ckpt):
    """New inputs reach the static buffers every call, outputs are copies (not the buffer the next call
    overwrites), and a new shape gets its own entry."""
    dit = load_dit(tiny_ckpt)
    graph = torch_fast.StepGraph(dit, capture=False)
    a, b = _dit_inputs(dit, 40, 64, seed=1), _dit_inputs(dit, 20, 32, seed=2)
    b_same_shape = _dit_inputs(dit, 50, 64, seed=3)
    with torch.no_grad():
        ra = graph(*a)
        ra_copy = ra.clone()
        rb = graph(*b_same_shape)
        assert torch.equal(ra, ra_copy)
        assert torch.allclose(ra, dit(*a), atol=1e-6) and torch.allclose(rb, dit(*b_same_shape), atol=1e-6)
        assert len(graph.graphs) == 1
        assert torch.allclose(graph(*b), dit(*b), atol=1e-6)
        assert len(graph.graphs) == 2 and graph.replays == 3


# -- FP8 --------------------------------------------------------------------------------------------------------
def test_recorded_input_ranges_and_static_fp8(tiny_ckpt, monkeypatch):
    dit = load_dit(tiny_ckpt)
    names = fast.block_projections(dit)
    assert len(names) == 4 * (2 * dit.cfg.n_refiner_layers + dit.cfg.n_layers)
    seen: dict[str, list[np.ndarray]] = {}  # an independent record: every input, reduced afterwards
    hooks = [dit.get_submodule(n).register_forward_hook(
        lambda m, args, out, n=n: seen.setdefault(n, []).append(args[0].detach().numpy().copy())) for n in names]
    inputs = [_dit_inputs(dit, 40, 64, seed=s) for s in (1, 2)]
    with torch.no_grad(), fast.record_input_amax(dit, names) as scales:
        for i, x in enumerate(inputs):
            dit.context(_feats(dit, 64, seed=i), x[3])
            dit(*x)
    for h in hooks:
        h.remove()
    for n in names:
        assert scales[f"{n}.input_amax"].item() == pytest.approx(max(np.abs(a).max() for a in seen[n]), rel=1e-6)
        assert scales[f"{n}.weight_amax"].item() == pytest.approx(dit.get_submodule(n).weight.abs().max().item())

    with torch.no_grad():
        reference = dit(*inputs[0])
    model = fast.share_copy(dit)
    calls = []
    real = torch._scaled_mm
    monkeypatch.setattr(torch, "_scaled_mm", lambda *a, **k: (calls.append(k["use_fast_accum"]), real(*a, **k))[1])
    assert fast.fp8_blocks(model, scales, fast_accum=True) == len(names)
    layers = {n: m for n, m in model.named_modules() if isinstance(m, fast.FP8Linear)}
    assert sorted(layers) == names
    for n, m in layers.items():
        assert torch.allclose(m.input_scale, scales[f"{n}.input_amax"] / 448.0)
    with torch.no_grad():
        out = model(*inputs[0])
    assert calls and all(calls)
    assert ((out - reference).norm() / reference.norm()).item() < 0.1
    assert not any(isinstance(m, fast.FP8Linear) for m in dit.modules())  # the original keeps its layers


def test_record_input_amax_needs_a_run(tiny_ckpt):
    dit = load_dit(tiny_ckpt)
    with pytest.raises(ValueError, match="no input seen"):
        with fast.record_input_amax(dit, fast.block_projections(dit)[:2]):
            pass
    assert not any(m._forward_pre_hooks for m in dit.modules())


def test_share_copy_shares_tensors_not_structure(tiny_ckpt):
    dit = load_dit(tiny_ckpt)
    copy = fast.share_copy(dit)
    assert all(a is b for a, b in zip(dit.parameters(), copy.parameters()))
    fast.compile_blocks(copy, None, "eager")
    fast.set_dense_attention(copy, True)
    assert all(m._compiled_call_impl is None for m in dit.modules() if isinstance(m, Block))
    assert all(m._compiled_call_impl is not None for m in copy.modules() if isinstance(m, Block))
    assert not any(m.dense for m in dit.modules() if isinstance(m, Attention))


# -- dynamo's counters ------------------------------------------------------------------------------------------
def test_compile_counters_see_graphs_breaks_and_recompiles():
    torch_fast.reset_compile_counters()

    def f(x):
        y = x.sin()
        torch._dynamo.graph_break()
        return y.cos()

    compiled = torch.compile(f, backend="eager", dynamic=False)
    compiled(torch.ones(3))
    c = torch_fast.compile_counters()
    assert c["unique_graphs"] >= 2 and c["graph_breaks"] >= 1 and c["recompiles"] == 0
    compiled(torch.ones(5))  # another static shape: a recompilation
    c = torch_fast.compile_counters()
    assert c["recompiles"] >= 1 and "size mismatch" in " ".join(c["recompile_reasons"])
    torch_fast.reset_compile_counters()
    c = torch_fast.compile_counters()
    assert c["unique_graphs"] == c["graph_breaks"] == c["recompiles"] == c["frames_total"] == 0


# -- the stage timer ------------------------------------------------------------------------------------------
def test_stage_timer_waits_for_the_gpu(monkeypatch):
    events = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: events.append("sync"))
    timings = {}
    with timed(timings, "denoise"):
        events.append("work")
    assert events == ["sync", "work", "sync"] and timings["denoise"] >= 0
    events.clear()
    with timed(None, "denoise"):  # no timings asked for: no sync
        events.append("work")
    assert events == ["work"]


# -- the script and the shell plumbing --------------------------------------------------------------------------
def _env():
    return {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}


def test_gpu_script_every_row_reduced_on_cpu(tmp_path):
    """Every row's code path on the reduced configs: each writes its image, diffs and counters; ours match
    diffusers' image, the compiled and per-step-graph rows match ours eager, FP8 stays close to it."""
    g = _script()
    r = subprocess.run([sys.executable, str(SCRIPT), *QUICK, "--rows", ",".join(g.ROWS), "--out", str(tmp_path)],
                       capture_output=True, text=True, timeout=900, cwd=ROOT, env=_env())
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    report = json.loads((tmp_path / "gpu_turbo_report.json").read_text())
    res = report["results"]
    assert list(res) == list(g.ROWS)
    for key, row in res.items():
        assert row["median_s"] > 0 and (tmp_path / row["image"]).is_file(), key
        assert "error" not in row and "skipped" not in row, key
    assert res["eager"]["max_abs_diff_vs_diffusers"] <= 2
    assert res["diffusers-compile"]["max_abs_diff_vs_diffusers"] <= 1
    assert "psnr_vs_ours_bf16_db" not in res["diffusers-compile"]  # diffusers' row: not one of ours
    for key in ("step", "step-cudnn"):
        assert res[key]["max_abs_diff_vs_ours_bf16"] <= 1, key
    for key in ("fp8-step", "fp8-step-cudnn"):
        assert res[key]["psnr_vs_ours_bf16_db"] >= 30, key
        assert res[key]["fp8_layers"] == 16
    assert res["fp8-step"]["fp8_scales"].startswith("static")
    assert res["eager"]["compile"]["unique_graphs"] == 0
    for key in ("step", "fp8-step", "step-cudnn", "fp8-step-cudnn", "diffusers-compile"):
        c = res[key]["compile"]
        assert c["unique_graphs"] >= 3 and c["graph_breaks"] == 0 and c["recompiles_in_timed_runs"] == 0, key
        assert res[key]["notes"] == [] and res[key].get("fallbacks", {}) == {}, key
    for key in ("step", "fp8-step"):  # first call, second call, one timed run: 2 steps each
        assert res[key]["step_graphs"]["replays"] == 6 and res[key]["step_graphs"]["captured"] == 0, key
    attention = res["eager"]["attention"]
    assert attention["dit_step_unmasked_s"] > 0 and attention["dit_step_unmasked_cudnn_first_s"] > 0
    assert attention["cudnn_takes_unmasked"] is False  # no cuDNN on the CPU: said, not hidden
    assert "goal_2x_met" not in report["summary"]  # a reduced CPU run says nothing about the goal
    assert report["summary"]["speedup_vs_diffusers_compile"] > 0
    assert report["summary"]["best"] not in ("diffusers", "diffusers-compile")
    assert "| fp8-step |" in r.stdout and "best:" in r.stdout


def test_gpu_script_sigterm_keeps_what_ran(tmp_path):
    """The outer timeout's SIGTERM during a row: the rows done stay, the running one is reported as killed."""
    proc = subprocess.Popen([sys.executable, str(SCRIPT), *QUICK, "--rows", "diffusers,eager,step",
                             "--out", str(tmp_path)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            cwd=ROOT, env=_env())
    try:
        for line in proc.stdout:
            if line.startswith("eager: running"):
                proc.send_signal(signal.SIGTERM)
                break
        rest = proc.communicate(timeout=300)[0]
    finally:
        proc.kill()
    assert proc.returncode == 124, rest[-2000:]
    report = json.loads((tmp_path / "gpu_turbo_report.json").read_text())
    assert report["results"]["diffusers"]["median_s"] > 0 and (tmp_path / "diffusers.png").is_file()
    assert "killed by the outer timeout" in report["results"]["eager"].get("error", ""), (report, rest[-3000:])
    assert "step" not in report["results"] and report["killed_at_s"] > 0


def test_gpu_script_leaves_no_build_folder(tmp_path):
    """The benchmark's own build folder (tokenizer, configs, manifest in a temp folder) is removed when it ends."""
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    r = subprocess.run([sys.executable, str(SCRIPT), *QUICK, "--rows", "eager", "--out", str(tmp_path / "out")],
                       capture_output=True, text=True, timeout=300, cwd=ROOT, env={**_env(), "TMPDIR": str(tmp)})
    assert r.returncode == 0, r.stderr[-2000:]
    assert not list(tmp.glob("zimage-gpu-*"))


def test_gpu_script_arguments(tmp_path):
    for bad in (["--rows", "diffusers,turbo"], ["--repeats", "0"], [], ["--rows", "diffusers,eager,diffusers"]):
        r = subprocess.run([sys.executable, str(SCRIPT), *bad] + (["--out", str(tmp_path)] if bad else []),
                           capture_output=True, text=True, timeout=120, cwd=ROOT, env=_env())
        assert r.returncode == 2 and "error:" in r.stderr, bad


def test_gpu_script_deadline_skips_rows(tmp_path):
    r = subprocess.run([sys.executable, str(SCRIPT), *QUICK, "--rows", "eager", "--deadline-s", "0",
                        "--out", str(tmp_path)], capture_output=True, text=True, timeout=300, cwd=ROOT, env=_env())
    assert r.returncode == 0, r.stderr[-2000:]
    row = json.loads((tmp_path / "gpu_turbo_report.json").read_text())["results"]["eager"]
    assert row["skipped"].startswith("time budget")


def _probe_wheel(folder: Path) -> Path:
    """A minimal pure-Python wheel (the install step is what is checked)."""
    folder.mkdir()
    path = folder / "zimage_probe-0.1-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("zimage_probe/__init__.py", "VALUE = 1\n")
        z.writestr("zimage_probe-0.1.dist-info/METADATA", "Metadata-Version: 2.1\nName: zimage_probe\nVersion: 0.1\n")
        z.writestr("zimage_probe-0.1.dist-info/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\n"
                   "Tag: py3-none-any\n")
        z.writestr("zimage_probe-0.1.dist-info/RECORD", "")
    return folder


def _gpu_run(tmp_path, **env):
    out = tmp_path / "out"
    e = {**os.environ, "GPU_RUN_CPU": "1", "OUT": str(out), "PYTHON": sys.executable, **env}
    r = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_run.sh")], capture_output=True, text=True,
                       timeout=900, cwd=tmp_path, env=e)
    return r, out


def test_gpu_run_sh_dry_run(tmp_path):
    """The device script's CPU mode: carried wheels installed, the benchmark run, the files where the device
    call brings them back from (at most 8, at most two folders down), the log kept."""
    r, out = _gpu_run(tmp_path, GPU_RUN_LEGACY="1", GPU_RUN_WHEELS=str(_probe_wheel(tmp_path / "wheels")),
                      GPU_RUN_ARGS="--rows diffusers,eager")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    log = (out / "gpu_run.log").read_text()
    assert "installed: zimage_probe-0.1" in log and "| eager |" in log and log.strip().endswith("Z")
    files = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    assert files == ["gpu/diffusers.png", "gpu/eager.png", "gpu/gpu_turbo_report.json", "gpu_run.log"]


def test_gpu_run_sh_outer_timeout(tmp_path):
    """Cut short by the outer timeout: exit status 124, said in the log, and the table (or that no report exists)
    still printed."""
    r, out = _gpu_run(tmp_path, GPU_RUN_LEGACY="1", GPU_RUN_TIMEOUT="3", GPU_RUN_WHEELS=str(tmp_path / "none"))
    assert r.returncode == 124
    log = (out / "gpu_run.log").read_text()
    assert "no wheels in" in log and "outer timeout after 3 s" in log
    assert "no report was written" in log or "| row |" in log


def test_gpu_run_sh_product_dry_run(tmp_path):
    """The product mode's plumbing on the CPU (the tiny checkpoint for the real-size one): two graphless builds for
    the compiled Torch runtime (bf16, and fp8 calibrated on prompts disjoint from the timed ones), then the product's
    own `bench` on each, under one time budget; the reports where the device call brings them back from (<= 8 files)."""
    r, out = _gpu_run(tmp_path, GPU_RUN_MODEL="tiny", GPU_RUN_WORK=str(tmp_path / "work"),
                      GPU_RUN_WHEELS=str(tmp_path / "none"), GPU_RUN_SIZE="64", GPU_RUN_STEPS="2", GPU_RUN_CALIB="2",
                      GPU_RUN_BUILD_ARGS="--calib-side 64 --calib-steps 1 --gate-prompts 1",
                      GPU_RUN_BACKENDS="diffusers,torch-eager", GPU_RUN_FP8_BACKENDS="torch-eager",
                      GPU_RUN_ARGS="--repeats 2 --warmups 1 --device cpu")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    log = (out / "gpu_run.log").read_text()
    assert "build bf16" in log and "build fp8" in log and "graphs: False" in log
    files = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    assert files == [f"gpu/bench-{p}/report.{x}" for p in ("bf16", "fp8") for x in ("json", "md", "png")] + \
        ["gpu_run.log"]
    bf16, fp8 = (json.loads((out / "gpu" / f"bench-{p}" / "report.json").read_text()) for p in ("bf16", "fp8"))
    assert [r["name"] for r in bf16["backends"]] == ["diffusers", "torch-eager"]
    assert all(len(r["runs"]) == 2 for r in bf16["backends"] + fp8["backends"])
    assert fp8["build"]["precision"] == "fp8" and bf16["build"]["precision"] == "bf16"
    assert fp8["calibration"]["timed_prompts_in_calibration"] == [] and bf16["calibration"] is None
    assert bf16["method"]["deadline_s"] > 0 and fp8["method"]["deadline_s"] > 0
    manifest = json.loads((tmp_path / "work" / "fp8" / "manifest.json").read_text())
    assert manifest["export"]["graphs"] is False and not (tmp_path / "work" / "fp8" / "onnx").exists()
