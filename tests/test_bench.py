"""The benchmark harness on the tiny model (CPU backends): report files and structure, images against diffusers,
and the DiT FLOP model against PyTorch's FLOP counter."""

import json

import pytest
import torch
from PIL import Image
from torch.utils.flop_counter import FlopCounterMode

from zimage_deploy import bench
from zimage_deploy.models.fast import dit_flops
from zimage_deploy.models.load import load_dit


def test_bench_report(tiny_fp32, tmp_path):
    out = tmp_path / "report"
    assert bench.main(["--engine-dir", str(tiny_fp32), "--report", str(out), "--repeats", "2", "--height", "64",
                       "--width", "96", "--backends", "diffusers,torch,onnxruntime,tensorrt"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["request"]["height"] == 64 and report["machine"]["torch"] == torch.__version__
    assert report["dit_flops_per_step"] > 0 and report["matmul_peak_tflops"] > 0
    rows = {r["name"]: r for r in report["backends"]}
    assert set(rows) == {"diffusers", "torch", "onnxruntime", "tensorrt"}
    assert "skipped" in rows["tensorrt"]  # no engines in a CPU build: reported, not fatal
    for name in ("diffusers", "torch", "onnxruntime"):
        row = rows[name]
        assert row["end_to_end"]["runs"] == 2 and row["end_to_end"]["median_s"] > 0
        assert set(row["stages_s"]) == {"encode", "denoise", "decode"}
        assert row["dit_tflops"] > 0 and 0 < row["dit_fraction_of_matmul_peak"]
        assert row["memory"]["cpu_peak_rss_gib"] > 0
        assert row["max_abs_diff_vs_diffusers"] <= 2  # float32 backends: same image as diffusers
    md = (out / "report.md").read_text()
    assert all(f"| {name} |" in md for name in rows)
    assert Image.open(out / "report.png").size[0] > 100


def _math_sdpa(q, k, v, attn_mask=None, **kw):
    s = q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5
    if attn_mask is not None:
        s = s + attn_mask
    return s.softmax(-1) @ v


@pytest.mark.parametrize("h,w,cap", [(32, 48, 40), (16, 16, 64)])
def test_dit_flop_model(tiny_ckpt, monkeypatch, h, w, cap):
    """The analytic count used for TFLOP/s agrees with PyTorch's FLOP counter (attention as plain matmuls)."""
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", _math_sdpa)
    model = load_dit(tiny_ckpt)
    latents, t = torch.randn(1, 16, h, w), torch.tensor([0.5])
    states, lens = torch.randn(1, 64, model.cfg.dim), torch.tensor([cap])
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(latents, t, states, lens)
    predicted = dit_flops(model.cfg, (h // 2) * (w // 2), cap)
    assert abs(counter.get_total_flops() / predicted - 1) < 0.03


def test_regional_compile_matches_eager(tiny_ckpt):
    """The fast path's regional compilation (here without CUDA graphs, on the CPU) computes what eager does."""
    from zimage_deploy.models.fast import compile_blocks

    eager, compiled = load_dit(tiny_ckpt), load_dit(tiny_ckpt)
    assert compile_blocks(compiled, mode=None) == 4
    g = torch.Generator().manual_seed(0)
    args = (torch.randn(1, 16, 8, 8, generator=g), torch.tensor([0.5]), torch.randn(1, 32, 64, generator=g),
            torch.tensor([10]))
    with torch.no_grad():
        a, b = eager(*args), compiled(*args)
    assert ((a - b).norm() / a.norm()).item() < 1e-5
