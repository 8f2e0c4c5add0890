"""Calibration against an independent measurement: each layer's recorded activation range (`NAME.input_amax` in the
scale files the quantize stage writes) equals the largest |input| a plain forward hook sees on that layer over the
same calibration loop (the same prompts, size, steps and seeds, through the runtime's sampling loop), for FP8 (DiT
and text encoder) and NVFP4 (DiT). INT4 (AWQ or RTN) records no activation range: its activations stay in the
graph's dtype (its pre-quantization scales are a search result, not a range).

The DiT's loop runs behind the text encoder as deployed: quantized (emulated from its scale file) when the build
quantizes it, as the quantize stage calibrates the DiT behind the calibrated text encoder."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from conftest import need
from zimage_deploy import build
from zimage_deploy.buildfolder import BuildFolder
from zimage_deploy.export.specs import DTYPES
from zimage_deploy.models.emulate import apply_scales
from zimage_deploy.models.load import load_dit, load_text_encoder
from zimage_deploy.quantize.calibrate import sampling_loop, text_encoder_loop
from zimage_deploy.quantize.options import load_prompts
from zimage_deploy.runtime.backends import TorchBackend
from zimage_deploy.runtime.pipeline import Pipeline
from zimage_deploy.runtime.prompt import PromptTokenizer
from zimage_deploy.scales import load_scales

CALIB = ["--calib-size", "2", "--calib-steps", "2", "--skip-parity", "--no-quality-gate"]
# (build flags, the exported build it starts from: its graphs are up to date, only quantized)
BUILDS = {
    "fp8": (["--target", "cpu", "--precision", "fp8", "--text-encoder-precision", "fp8"], "tiny_fp32"),
    "nvfp4": (["--target", "rtx5090", "--precision", "nvfp4", "--text-encoder-precision", "bf16", "--skip-engines"],
              "tiny_bf16"),
}
# recorded vs hooked range: the same float values for an unquantized text encoder (measured exact); behind the
# emulated FP8 text encoder the DiT's inputs differ from modelopt's fake quantization in the last bits (measured
# 3.6e-7 relative). A range recorded at half its value is 50 % off.
RTOL = {"text_encoder": 1e-6, "transformer": 1e-5}


@pytest.fixture(scope="module")
def calibrated(request, tmp_path_factory, tiny_ckpt):
    """kind -> (build folder, manifest), each built once."""
    need("modelopt")
    built = {}

    def get(kind):
        if kind not in built:
            flags, start = BUILDS[kind]
            out = Path(tmp_path_factory.mktemp(f"calib-{kind}")) / "b"
            shutil.copytree(request.getfixturevalue(start), out)
            assert build.main(["--model", str(tiny_ckpt), "--out", str(out), *CALIB, *flags]) == 0
            built[kind] = out, json.loads((out / "manifest.json").read_text())
        return built[kind]
    return get


class MaxInput:
    """Forward pre-hooks recording the largest |input| of each named module (float32, as the scale files hold)."""

    def __init__(self, model: torch.nn.Module, names):
        modules = dict(model.named_modules())
        self.amax = {n: torch.tensor(0.0) for n in names}
        self.handles = [modules[n].register_forward_pre_hook(self._hook(n)) for n in names]

    def _hook(self, name):
        def hook(module, args):
            self.amax[name] = torch.maximum(self.amax[name], args[0].detach().abs().amax().float().cpu())
        return hook

    def remove(self):
        for h in self.handles:
            h.remove()


def _recorded(out: Path, manifest: dict, component: str) -> tuple[dict, dict]:
    """(layer -> recorded input_amax, the component's calibration record)."""
    q = manifest["components"][component]["quantization"]
    scales, _ = load_scales(BuildFolder(out).file(q["scales"]))
    return {k[: -len(".input_amax")]: v for k, v in scales.items() if k.endswith(".input_amax")}, q["calibration"]


def _text_encoder(out: Path, manifest: dict, dtype) -> torch.nn.Module:
    """The text encoder as the DiT's calibration saw it (quantized builds: emulated from the build's scales)."""
    te = load_text_encoder(Path(manifest["model"]["path"]), dtype)
    q = manifest["components"]["text_encoder"].get("quantization")
    if q:
        apply_scales(te, load_scales(BuildFolder(out).file(q["scales"]))[0], q["scheme"], q["block"] or 0)
    return te


def _compare(recorded: dict, hooked: dict, rtol: float) -> None:
    assert recorded and set(recorded) == set(hooked)
    off = {n: float(recorded[n] / hooked[n]) for n in recorded
           if not torch.isclose(recorded[n].float().reshape(()), hooked[n], rtol=rtol, atol=0.0)}
    assert not off, f"recorded / hooked input ranges off by more than {rtol:.0e}: {off}"


@torch.no_grad()
def test_text_encoder_ranges_equal_a_forward_hook(calibrated):
    out, manifest = calibrated("fp8")
    assert manifest["components"]["text_encoder"]["precision"] == "fp8"
    recorded, calib = _recorded(out, manifest, "text_encoder")
    dtype = DTYPES[manifest["components"]["text_encoder"]["compute_dtype"]]
    te = load_text_encoder(Path(manifest["model"]["path"]), dtype)
    hooks = MaxInput(te, recorded)
    tok = PromptTokenizer(BuildFolder(out).tokenizer, manifest["defaults"]["max_sequence_length"])
    prompts = load_prompts(None, calib["count"])
    batches = [tok(prompts[i:i + 8]) for i in range(0, len(prompts), 8)]  # the stage's batches of 8 prompts
    text_encoder_loop(batches, "cpu")(te)
    hooks.remove()
    _compare(recorded, hooks.amax, RTOL["text_encoder"])


@pytest.mark.parametrize("kind", list(BUILDS))
@torch.no_grad()
def test_dit_ranges_equal_a_forward_hook(calibrated, kind):
    out, manifest = calibrated(kind)
    recorded, calib = _recorded(out, manifest, "transformer")
    assert manifest["components"]["transformer"]["precision"] == kind
    dtype = DTYPES[manifest["components"]["transformer"]["compute_dtype"]]
    dit = load_dit(Path(manifest["model"]["path"]), dtype)
    hooks = MaxInput(dit, recorded)
    backend = TorchBackend(out, manifest, device="cpu",
                           modules={"transformer": dit, "text_encoder": _text_encoder(out, manifest, dtype)})
    side = calib["size"][0]
    sampling_loop(Pipeline(out, backend), load_prompts(None, calib["count"]), side, calib["steps"])(dit)
    hooks.remove()
    _compare(recorded, hooks.amax, RTOL["transformer"])
