"""The benchmark harness on the tiny model (CPU backends): the report's derived figures recomputed from its own
measurements and from an independent FLOP count, its image differences recomputed against diffusers, and the
DiT FLOP model against PyTorch's FLOP counter. (How fast anything runs is not a test: that is the benchmark's
output, not its correctness.)"""

import json

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.flop_counter import FlopCounterMode

from zimage_deploy import bench
from zimage_deploy.models.fast import dit_flops
from zimage_deploy.models.load import load_dit

PROMPT, H, W, SEED = "a red fox in the snow, watercolor", 64, 96, 42


def test_bench_report(tiny_fp32, tiny_ckpt, tmp_path):
    """Report structure; every derived figure (images/s, DiT seconds per step, TFLOP/s, fraction of the matmul
    peak) follows from the measured ones; the stage timers nest inside their own (separate, untimed) run; every timed
    run is stored, the rows interleaved; the FLOPs per step are the model's
    for 24 image tokens (64x96 px / 8 / patch 2) and the prompt's tokens; each backend's max difference from
    diffusers equals the one recomputed here from diffusers' and our pipeline's images."""
    from diffusers import ZImagePipeline

    from zimage_deploy.models.dit import DiTConfig
    from zimage_deploy.runtime.pipeline import Pipeline
    from zimage_deploy.runtime.prompt import PromptTokenizer

    out = tmp_path / "report"
    assert bench.main(["--engine-dir", str(tiny_fp32), "--report", str(out), "--repeats", "2", "--warmups", "1", "--height", str(H),
                       "--width", str(W), "--seed", str(SEED), "--prompt", PROMPT,
                       "--backends", "diffusers,torch,onnxruntime,tensorrt"]) == 0
    report = json.loads((out / "report.json").read_text())
    req = report["request"]
    assert (req["height"], req["width"], req["seed"], req["prompt"]) == (H, W, SEED, PROMPT)
    assert report["machine"]["torch"] == torch.__version__
    assert req["prompts"] == [PROMPT] and report["command"][-1] == "diffusers,torch,onnxruntime,tensorrt"
    assert report["method"]["warmups_per_prompt"] == 1 and report["method"]["interleaved"]
    assert set(report["git"]) == {"commit", "dirty"} and report["gpu_state"] == {"before": None, "after": None}
    cfg = DiTConfig.from_diffusers(json.loads((tiny_ckpt / "transformer" / "config.json").read_text()))
    caption = int(PromptTokenizer(tiny_fp32 / "tokenizer")([PROMPT])[1].sum())
    assert report["dit_flops_per_step"] == dit_flops(cfg, (H // 16) * (W // 16), caption)
    rows = {r["name"]: r for r in report["backends"]}
    assert set(rows) == {"diffusers", "torch", "onnxruntime", "tensorrt"}
    assert "skipped" in rows["tensorrt"]  # no engines in a CPU build: reported, not fatal

    diffusers = ZImagePipeline.from_pretrained(tiny_ckpt, dtype=torch.float32)
    diffusers.set_progress_bar_config(disable=True)
    reference = np.asarray(diffusers(PROMPT, height=H, width=W, num_inference_steps=req["steps"],
                                     guidance_scale=req["guidance_scale"],
                                     generator=torch.Generator("cpu").manual_seed(SEED)).images[0], np.int16)
    md = (out / "report.md").read_text()
    for name in ("diffusers", "torch", "onnxruntime"):
        row = rows[name]
        end, stages = row["end_to_end"], row["stages_s"]
        assert end["runs"] == 2 and end["p90_s"] >= end["median_s"]
        assert row["images_per_s"] == pytest.approx(1 / end["median_s"])
        assert set(stages) == {"encode", "denoise", "decode"} and sum(stages.values()) <= row["stage_run_s"]
        assert [r["prompt"] for r in row["runs"]] == [0, 0]
        assert end["median_s"] == pytest.approx(np.median([r["s"] for r in row["runs"]]))
        assert row["dit_per_step_s"] == pytest.approx(stages["denoise"] / req["steps"])
        assert row["dit_tflops"] == pytest.approx(report["dit_flops_per_step"] / row["dit_per_step_s"] / 1e12)
        assert row["dit_fraction_of_matmul_peak"] == pytest.approx(row["dit_tflops"] / report["matmul_peak_tflops"])
        assert "cpu_peak_rss_gib" in row["memory"]
        line = next(ln for ln in md.splitlines() if ln.startswith(f"| {name} |"))
        assert f"| {end['median_s']:.3f} |" in line and line.endswith(f"| {row['max_abs_diff_vs_diffusers']} |")
        if name != "diffusers":  # (the diffusers row is the reference itself: 0 by definition)
            ours = np.asarray(Pipeline(tiny_fp32, name)(PROMPT, H, W, req["steps"], SEED, progress=False)[0],
                              np.int16)
            assert row["max_abs_diff_vs_diffusers"] == int(np.abs(ours - reference).max()) <= 2
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


def test_deadline_keeps_what_was_measured(monkeypatch):
    """`--deadline-s` (a lent GPU's one call): no row is loaded and no timed round started after the deadline; the
    rows keep their runs and say where they were cut (a clock that moves only when a fake row works)."""
    clock = [0.0]
    monkeypatch.setattr(bench.time, "perf_counter", lambda: clock[0])

    def maker(load_s, run_s):
        def make():
            clock[0] += load_s

            def run(req, stages=False):
                clock[0] += run_s
                return (Image.new("RGB", (8, 8)), {"encode": 0.0, "denoise": run_s, "decode": 0.0}) if stages else None
            return run
        return make

    makers = {"a": maker(1, 1), "b": maker(60, 2), "c": maker(1, 1)}
    req = {"prompts": ["p", "q"], "prompt": "p"}
    rows = {r["name"]: r for r in bench.bench_rows(makers, ["a", "b", "c"], req, 5, 1, "cpu", deadline=50.0)}
    assert rows["c"]["skipped"].startswith("deadline")
    for name in ("a", "b"):
        assert len(rows[name]["runs"]) == 1 and rows[name]["cut_by_deadline"] == "1 of 5 timed rounds (--deadline-s)"
    full = {r["name"]: r for r in bench.bench_rows(makers, ["a", "c"], req, 3, 1, "cpu")}
    assert all(len(r["runs"]) == 3 and "cut_by_deadline" not in r for r in full.values())
    with pytest.raises(bench.UserError, match="--deadline-s"):
        bench.main(["--build-dir", "nowhere", "--report", "x", "--deadline-s", "-1"])
