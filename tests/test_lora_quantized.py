"""Run-time LoRAs on FP8, INT4 and NVFP4 builds (Torch backend: a float side branch beside each quantized layer).

Quality, stated: on each quantized build, PSNR of (quantized + LoRAs) against (float32 diffusers + the same LoRAs
through `set_adapters`) is within 2 dB of PSNR of (quantized) against (float32 diffusers): the LoRAs' effect
survives quantization. The set: a diffusers/PEFT LoRA of rank 64 on attention (to_q/k/v/out), rank 16 on the FFN,
alpha 32 != rank; a kohya LoRA of rank 4, alpha 8, on adaLN and the FFN. Also on every build: no LoRA = the base
image bit for bit, A then B = B alone bit for bit, a set of LoRAs above the bounds refused before anything runs.
"""

from pathlib import Path

import numpy as np
import pytest

from test_lora import (H, PROMPT, SEED, STEPS, W, cli, diffusers_image, image, make_peft_lora, peft_modules,
                       to_kohya)
from zimage_deploy import ZImageRuntime, build, generate
from zimage_deploy.errors import RequestError
from zimage_deploy.quantize.gate import psnr

FAST = ["--skip-parity", "--no-quality-gate", "--calib-size", "4", "--calib-side", "128", "--calib-steps", "4"]
BUILDS = {"fp8": ["--target", "cpu", "--precision", "fp8"],
          "int4": ["--target", "cpu", "--precision", "int4", "--int4-method", "rtn"],
          "nvfp4": ["--target", "rtx5090", "--precision", "nvfp4", "--text-encoder-precision", "bf16",
                    "--skip-engines"]}
KW = dict(seed=SEED, steps=STEPS, height=H, width=W)
SA, SB = 2.0, 3.0  # strong enough that the LoRAs' effect dwarfs the quantization error (INT4: ~32 dB)


@pytest.fixture(scope="module")
def quant_loras(tiny_ckpt, tmp_path_factory):
    d = Path(tmp_path_factory.mktemp("qloras"))
    attn = make_peft_lora(tiny_ckpt, d / "attn", 5, ("to_q", "to_k", "to_v", "to_out.0", "w1", "w2", "w3"), r=64,
                          lora_alpha=32, rank_pattern={"w1": 16, "w2": 16, "w3": 16})
    ada = make_peft_lora(tiny_ckpt, d / "ada", 6, ("adaLN_modulation.0", "w2"), r=4, lora_alpha=8)
    kohya = to_kohya(peft_modules(tiny_ckpt, ada), d / "ada-kohya.safetensors")
    return {"attn": attn, "ada": ada, "ada-kohya": kohya}


@pytest.fixture(scope="module")
def quant_refs(tiny_ckpt, quant_loras):
    both = [(quant_loras["attn"], SA), (quant_loras["ada"], SB)]
    return {"base": diffusers_image(tiny_ckpt), "both": diffusers_image(tiny_ckpt, both)}


def _check(out, backend, kind, quant_loras, quant_refs):
    rt = ZImageRuntime(out, backend=backend)
    base = image(rt.generate(PROMPT, **KW))
    both_set = [(quant_loras["attn"], SA), (quant_loras["ada-kohya"], SB)]
    both = image(rt.generate(PROMPT, loras=both_set, **KW))
    p_base, p_both = psnr(base, quant_refs["base"]), psnr(both, quant_refs["both"])
    print(f"{kind} {backend}: PSNR quantized vs float32 {p_base:.2f} dB; with LoRAs {p_both:.2f} dB; LoRA effect "
          f"{psnr(quant_refs['both'], quant_refs['base']):.2f} dB")
    assert np.isfinite(p_base)  # quantization changed something
    assert psnr(quant_refs["both"], quant_refs["base"]) < p_base - 6  # the LoRAs matter far more than the gap
    assert p_both >= p_base - 2.0
    b_after = image(rt.generate(PROMPT, loras=[(quant_loras["ada"], SB)], **KW))  # after both: B alone
    fresh = ZImageRuntime(out, backend=backend)
    assert np.array_equal(b_after, image(fresh.generate(PROMPT, loras=[(quant_loras["ada"], SB)], **KW)))
    assert np.array_equal(image(rt.generate(PROMPT, **KW)), base)  # no LoRA: the base image, bit for bit
    with pytest.raises(RequestError, match="max_loras"):
        rt.generate(PROMPT, loras=[(quant_loras["attn"], 1.0)] * 5, **KW)
    small = ZImageRuntime(out, backend=backend)
    small.loras.configure(max_rank=32)
    with pytest.raises(RequestError, match="rank 64 on .*max_lora_rank"):
        small.generate(PROMPT, loras=both_set, **KW)
    assert np.array_equal(image(small.generate(PROMPT, **KW)), base)  # nothing half-applied


@pytest.mark.parametrize("kind", list(BUILDS))
def test_loras_on_quantized_builds(kind, tiny_ckpt, tmp_path, quant_loras, quant_refs, capsys):
    """Torch (emulated quantized layers) on every build, ONNX Runtime on the Q/DQ graphs it runs (FP8, INT4)."""
    out = tmp_path / kind
    assert build.main(["--model", str(tiny_ckpt), "--out", str(out), *FAST, *BUILDS[kind]]) == 0
    for backend in ("torch", "onnxruntime") if kind != "nvfp4" else ("torch",):
        _check(out, backend, kind, quant_loras, quant_refs)
    png = tmp_path / "x.png"
    code, err = cli(generate.main, ["--engine-dir", str(out), "--backend", "torch", "--prompt", PROMPT, "--output",
                                    str(png), *[a for _ in range(5) for a in ("--lora", str(quant_loras["ada"]))]],
                    capsys)
    assert code == 2 and "max_loras" in err and not png.exists(), err
