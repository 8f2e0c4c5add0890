"""The Torch backend's compiled mode on the CPU (runtime/torch_fast.py): the same images as eager within stated
tolerances (float32: tight; BF16; FP8 builds, compiled through real FP8 matmuls against eager's emulation), caption
buckets invisible, no recompiles after warm-up, the CUDA-graph cache bound, no silent eager fallback, and the
`torch_mode` plumbing. Inductor compiles slowly on a CPU: one inductor-compiled DiT serves this module, the rest
compiles with dynamo's "eager" backend (dynamo's guards and recompiles are the same; only code generation differs).
What needs a GPU (CUDA-graph capture, flash / cuDNN kernels, FP8 GEMM speed) is owed to a GPU session."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from PIL import Image

from backend_conformance import BackendConformance
from zimage_deploy.errors import RequestError, UserError
from zimage_deploy.runtime import torch_fast
from zimage_deploy.runtime.api import ZImageRuntime
from zimage_deploy.runtime.warmup import prompt_of_length

DYNAMO = "eager"  # torch.compile's backend that runs dynamo's graphs without generating code
SIZE = 64


@pytest.fixture(scope="module")
def eager(tiny_fp32):
    return ZImageRuntime(tiny_fp32, backend="torch", torch_mode="eager")


@pytest.fixture(scope="module")
def prompts(eager):
    """Prompts by chat-template token count: 70 and 110 tokens both fall in caption bucket 128 (padded to 96 and
    128 without buckets: two shapes), 20 tokens in bucket 32, 40 and 50 in bucket 64, a Chinese one (71 tokens)."""
    tok = eager.pipeline.tokenizer
    out = {n: prompt_of_length(tok, n, n - 2) for n in (20, 40, 50, 70, 110)}
    assert all(out.values())
    out["zh"] = "一只橘猫趴在窗台上晒太阳，窗外是开满樱花的街道"
    return out


def _run(rt, prompt, size=SIZE, **kw):
    return rt.generate(prompt, seed=3, steps=2, height=size, width=size, return_latents=True, **kw)


def _rel(a, b) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


def _max_abs(a, b) -> int:
    return int(np.abs(np.asarray(a, np.int16) - np.asarray(b, np.int16)).max())


@pytest.fixture(scope="module")
def inductor(tiny_fp32):
    """The DiT compiled by inductor (the code the GPU runs, generated for the CPU); text encoder and VAE by dynamo."""
    torch_fast.reset_compile_counters()
    rt = ZImageRuntime(tiny_fp32, backend="torch", torch_mode="compiled",
                       torch_options={"compile_backend": {"transformer": "inductor", "text_encoder": DYNAMO,
                                                          "vae_decoder": DYNAMO, "vae_encoder": DYNAMO}})
    yield rt
    torch_fast.reset_compile_counters()


def test_bucket_rule():
    assert [torch_fast.bucket(n, (32, 64, 128)) for n in (1, 32, 33, 64, 65, 128, 129, 200)] == \
        [32, 32, 64, 64, 128, 128, 160, 224]
    assert torch_fast.bucket(40, None) == 40


def test_inductor_matches_eager_with_padding_and_does_not_recompile_in_a_bucket(inductor, eager, prompts):
    """float32: the inductor-compiled DiT with the caption padded from 96 to its bucket (128, masked) gives eager's
    latents (no padding, unmasked) to 1e-4; a prompt of another length in the same bucket compiles nothing."""
    got, ref = _run(inductor, prompts[70]), _run(eager, prompts[70])
    assert _rel(got.latents, ref.latents) < 1e-4
    assert _max_abs(got.images[0], ref.images[0]) <= 1
    before = torch_fast.compile_counters()
    got, ref = _run(inductor, prompts[110]), _run(eager, prompts[110])
    after = torch_fast.compile_counters()
    assert _rel(got.latents, ref.latents) < 1e-4
    assert (after["unique_graphs"], after["recompiles"]) == (before["unique_graphs"], before["recompiles"])
    assert inductor.pipeline.backend.graph_stats()["entries"] == 1  # one step signature: (64x64, 128, batch 1)
    assert inductor.fallbacks() == {}
    assert inductor.pipeline.backend.models["transformer"].layers[0]._compiled_call_impl is not None


def test_bucket_padding_is_invisible_for_batches_and_chinese(tiny_fp32, eager, prompts):
    rt = ZImageRuntime(tiny_fp32, backend="torch", torch_mode="compiled", torch_options={"compile_backend": DYNAMO})
    for prompt in (prompts["zh"], [prompts[20], prompts[70]]):
        seeds = [3, 4] if isinstance(prompt, list) else 3
        got = rt.generate(prompt, seed=seeds, steps=2, height=SIZE, width=SIZE, return_latents=True)
        ref = eager.generate(prompt, seed=seeds, steps=2, height=SIZE, width=SIZE, return_latents=True)
        assert _rel(got.latents, ref.latents) < 1e-5
    assert rt.fallbacks() == {}


def test_warmup_then_no_compile_and_no_capture(tiny_fp32, prompts):
    rt = ZImageRuntime(tiny_fp32, backend="torch", torch_mode="compiled",
                       torch_options={"compile_backend": DYNAMO, "caption_buckets": (32, 64)})
    torch_fast.reset_compile_counters()
    report = rt.warmup([(SIZE, SIZE), (SIZE, 2 * SIZE)])
    assert report["prompts"] == 2 and report["graphs"]["entries"] == 4 and report["fallbacks"] == {}
    before = torch_fast.compile_counters()
    for prompt, (h, w) in [(prompts[20], (SIZE, 2 * SIZE)), (prompts[50], (SIZE, SIZE)),
                           (prompts[40], (SIZE, 2 * SIZE))]:
        rt.generate(prompt, seed=1, steps=1, height=h, width=w)
    after = torch_fast.compile_counters()
    assert (after["frames_total"], after["unique_graphs"]) == (before["frames_total"], before["unique_graphs"])
    assert rt.pipeline.backend.graph_stats()["entries"] == 4  # nothing new captured
    with pytest.raises(RequestError, match="multiple of"):
        rt.warmup([(SIZE + 1, SIZE)])


def test_graph_cache_is_bounded(tiny_fp32, eager):
    rt = ZImageRuntime(tiny_fp32, backend="torch", torch_mode="compiled",
                       torch_options={"compile_backend": DYNAMO, "max_graphs": 2})
    for size in (SIZE, 2 * SIZE, 3 * SIZE, SIZE):
        got = _run(rt, "a cat", size)
    stats = rt.pipeline.backend.graph_stats()
    assert stats["entries"] == 2 and stats["evicted"] == 2 and stats["max_graphs"] == 2
    assert _rel(got.latents, _run(eager, "a cat").latents) < 1e-5  # re-made after its eviction: still right
    with pytest.raises(UserError, match="max_graphs"):
        ZImageRuntime(tiny_fp32, backend="torch", torch_mode="compiled", torch_options={"max_graphs": 0})


def test_a_failed_compile_is_logged_counted_and_runs_eagerly(tiny_fp32, eager, caplog):
    """No silent fallback: a compiler error (here the VAE decoder's) is a warning and a count, the image eager's;
    an input error the eager module makes too is raised, not counted."""
    def broken(gm, example_inputs):
        raise RuntimeError("no compiler here")

    rt = ZImageRuntime(tiny_fp32, backend="torch", torch_mode="compiled",
                       torch_options={"compile_backend": {"transformer": DYNAMO, "text_encoder": DYNAMO,
                                                          "vae_decoder": broken}})
    with caplog.at_level(logging.WARNING, logger="zimage_deploy.runtime.torch_fast"):
        got = _run(rt, "a cat")
        _run(rt, "a cat")
    assert rt.fallbacks() == {"vae_decoder": 2}
    warnings = [r.getMessage() for r in caplog.records if "vae_decoder" in r.getMessage()]
    assert len(warnings) == 1 and "no compiler here" in warnings[0]
    assert _max_abs(got.images[0], _run(eager, "a cat").images[0]) == 0
    with pytest.raises(Exception):
        rt.pipeline.backend.run("vae_decoder", latents=torch.zeros(1, 3, 8, 8))  # wrong channels: eager fails too
    assert rt.fallbacks() == {"vae_decoder": 2}


def test_the_recompile_limit_is_a_counted_fallback(tiny_fp32, caplog):
    """Dynamo's recompile limit would silently run eager: here it is an error, so the fallback is counted."""
    rt = ZImageRuntime(tiny_fp32, backend="torch", torch_mode="compiled", torch_options={"compile_backend": DYNAMO})
    torch_fast.reset_compile_counters()
    assert torch._dynamo.config.fail_on_recompile_limit_hit
    with torch._dynamo.config.patch(recompile_limit=1), \
            caplog.at_level(logging.WARNING, logger="zimage_deploy.runtime.torch_fast"):
        _run(rt, "a cat", SIZE)
        _run(rt, "a cat", 2 * SIZE)  # new shapes: over the limit of one entry per code object
    assert rt.fallbacks() and all(n >= 1 for n in rt.fallbacks().values())
    assert any("RecompileLimit" in r.getMessage() for r in caplog.records)
    torch_fast.reset_compile_counters()


@pytest.mark.parametrize("build", ["bf16", "fp8"])
def test_bf16_and_fp8_builds(build, tiny_bf16, request):
    """BF16: compiled within BF16 rounding of eager. FP8: compiled runs the build's FP8 layers as real FP8 matmuls
    with the build's static scales (`FP8Linear`), eager emulates them with the same scales: close, not equal
    (the matmul's BF16 output rounding; measured PSNR printed)."""
    out = tiny_bf16 if build == "bf16" else request.getfixturevalue("fp8_build")
    eager = ZImageRuntime(out, backend="torch", torch_mode="eager")
    rt = ZImageRuntime(out, backend="torch", torch_mode="compiled", torch_options={"compile_backend": DYNAMO})
    got, ref = _run(rt, "a red fox in the snow"), _run(eager, "a red fox in the snow")
    err = _rel(got.latents, ref.latents)
    a, b = (np.asarray(x.images[0], np.float64) for x in (got, ref))
    psnr = 10 * np.log10(255**2 / max(np.mean((a - b) ** 2), 1e-12))
    print(build, f"latents rel {err:.2e}, image PSNR {psnr:.1f} dB")
    assert rt.fallbacks() == {}
    if build == "bf16":
        assert rt.pipeline.backend.fp8_layers == 0 and err < 2e-2 and psnr > 40  # measured 5.0e-3, 47.9 dB
    else:
        from zimage_deploy.models.fast import FP8Linear

        backend = rt.pipeline.backend
        assert backend.fp8_layers > 0 and backend.fp8
        assert sum(isinstance(m, FP8Linear) for m in backend.models["transformer"].modules()) == backend.fp8_layers
        assert not any(isinstance(m, FP8Linear) for m in eager.pipeline.backend.models["transformer"].modules())
        assert err < 0.06 and psnr > 38  # measured 2.1e-2, 43.6 dB


@pytest.fixture(scope="module")
def fp8_build(tmp_path_factory, tiny_ckpt):
    from zimage_deploy import build

    out = tmp_path_factory.mktemp("fp8-compiled")
    assert build.main(["--model", str(tiny_ckpt), "--target", "cpu", "--precision", "fp8", "--skip-parity",
                       "--calib-size", "8", "--out", str(out)]) == 0
    return out


def test_cfg_img2img_and_inpaint_run_compiled(base_fp32):
    """Base: CFG as one batch-2 step (positive and negative captions of different lengths in one bucket), img2img
    and inpainting (the VAE encoder compiled too): eager's latents, no fallback, batch 2 and batch 1 step graphs."""
    from conftest import synthetic_image

    eager = ZImageRuntime(base_fp32, backend="torch", torch_mode="eager")
    rt = ZImageRuntime(base_fp32, backend="torch", torch_mode="compiled", torch_options={"compile_backend": DYNAMO})
    image = synthetic_image(SIZE, SIZE, seed=2)
    mask = Image.new("L", (SIZE, SIZE), 0)
    mask.paste(255, (0, 0, SIZE // 2, SIZE))
    for kw in (dict(negative_prompt="blurry, low quality", guidance_scale=3.0),
               dict(images=[image], strength=0.7, guidance_scale=0.0),
               dict(images=[image], mask=mask, strength=0.9, guidance_scale=0.0)):
        got, ref = _run(rt, "a red fox in the snow", **kw), _run(eager, "a red fox in the snow", **kw)
        assert _rel(got.latents, ref.latents) < 1e-5, kw
    assert rt.fallbacks() == {}
    batches = sorted({key[0][0][0] for key in rt.pipeline.backend.wrappers["transformer"].graphs})
    assert batches == [1, 2]
    assert "vae_encoder" in rt.pipeline.backend.eager_wrappers  # compiled, with its eager twin


def test_edit_runs_compiled(edit_fp32):
    """Edit (Omni layout): the DiT's per-step call and context refiner compiled (caption bucket padding masked by
    the validity inputs), the SigLIP vision tower eager (documented); eager's latents."""
    from conftest import synthetic_image

    images = [synthetic_image(96, 96, seed=1)]
    kw = dict(images=images, guidance_scale=3.0)
    eager = ZImageRuntime(edit_fp32, backend="torch", torch_mode="eager")
    rt = ZImageRuntime(edit_fp32, backend="torch", torch_mode="compiled", torch_options={"compile_backend": DYNAMO})
    got, ref = _run(rt, "make the sky red", **kw), _run(eager, "make the sky red", **kw)
    assert _rel(got.latents, ref.latents) < 1e-5
    assert rt.fallbacks() == {} and rt.pipeline.backend.graph_stats()["replays"] >= 2


def test_torch_mode_plumbing(tiny_fp32, tmp_path):
    from zimage_deploy import generate
    from zimage_deploy.runtime.backends import resolve_backend

    assert torch_fast.default_torch_mode("cpu") == "eager" and torch_fast.default_torch_mode("cuda") == "compiled"
    assert ZImageRuntime(tiny_fp32, backend="torch").torch_mode == "eager"  # the CPU's default
    with pytest.raises(UserError, match="option of the torch backend"):
        ZImageRuntime(tiny_fp32, backend="onnxruntime", torch_mode="compiled")
    with pytest.raises(UserError, match="torch_mode must be one of"):
        ZImageRuntime(tiny_fp32, backend="torch", torch_mode="fast")
    with pytest.raises(UserError, match="option of the torch backend"):
        generate.main(["--build-dir", str(tiny_fp32), "--prompt", "x", "--backend", "onnxruntime", "--torch-mode",
                       "compiled", "--output", str(tmp_path / "x.png")])
    manifest = {"components": {"transformer": {"compute_dtype": "float32"}}}
    assert resolve_backend("auto", manifest) == "onnxruntime"
    assert resolve_backend("auto", {**manifest, "runtime": {"backend": "torch-compiled"}}) == "torch"


class TestTorchConformance(BackendConformance):
    """The conformance rules (tests/backend_conformance.py) in the Torch backend's default mode here (eager on the
    CPU)."""

    backend = "torch"
