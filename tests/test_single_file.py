"""Single-file checkpoints (issue 29): the Z-Image transformer in the original / ComfyUI layout, Qwen3 and Flux-VAE
files, FP8 files, fine-tuned DiTs over a diffusers folder; and what is refused.

Our writer of such files (zimage_deploy/tiny_files.py) is checked against diffusers' own converters; builds from
the files make the same images as the folder build."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import synthetic_image
from zimage_deploy import build
from zimage_deploy.runtime.open import open_pipeline
from zimage_deploy.tiny_files import _read, write_dit, write_text_encoder, write_vae


@pytest.fixture(scope="module")
def files(tmp_path_factory, tiny_ckpt):
    d = tmp_path_factory.mktemp("files")
    return dict(dit=write_dit(tiny_ckpt, d / "z_image_turbo.safetensors", dtype=torch.float32),
                te=write_text_encoder(tiny_ckpt, d / "qwen_3_4b.safetensors", dtype=torch.float32),
                vae=write_vae(tiny_ckpt, d / "ae.safetensors"), dir=d)


@pytest.mark.parametrize("name", ["tiny", "tiny-edit"])
def test_writer_matches_diffusers_converters(name, tmp_path):
    from diffusers.loaders.single_file_utils import (convert_ldm_vae_checkpoint,
                                                     convert_z_image_transformer_checkpoint_to_diffusers)
    from zimage_deploy.tiny import ensure_tiny

    ckpt = ensure_tiny(name)
    original = load_file(str(write_dit(ckpt, tmp_path / "dit.safetensors", dtype=torch.float32)))
    assert "model.diffusion_model.layers.0.attention.qkv.weight" in original
    assert "model.diffusion_model.x_embedder.weight" in original
    for got, ref in ((convert_z_image_transformer_checkpoint_to_diffusers(dict(original)), _read(ckpt / "transformer")),
                     (convert_ldm_vae_checkpoint(load_file(str(write_vae(ckpt, tmp_path / "ae.safetensors"))),
                                                 json.loads((ckpt / "vae" / "config.json").read_text())),
                      _read(ckpt / "vae"))):
        assert set(got) == set(ref)
        assert all(torch.equal(got[k], ref[k]) for k in ref)


def _image(out, backend, **kw):
    pipe = open_pipeline(out, backend)
    return np.asarray(pipe("a cat on a red sofa", 64, 64, 2, 3, progress=False, **kw)[0]).astype(int)


def _same_images(a, b, backends=("onnxruntime", "torch"), **kw):
    for backend in backends:
        x, y = _image(a, backend, **kw), _image(b, backend, **kw)
        assert y.std() > 10 and np.abs(x - y).max() <= 0.5, f"{backend}: images differ"


def _build(args, out):
    assert build.main([*args, "--target", "cpu", "--precision", "fp32", "--skip-parity", "--out", str(out)]) == 0
    return json.loads((out / "manifest.json").read_text())


def test_turbo_from_files(files, tiny_fp32, tmp_path):
    out = tmp_path / "b"
    m = _build(["--model", str(files["dit"]), "--text-encoder", str(files["te"]), "--vae", str(files["vae"])], out)
    assert m["variant"] == "turbo"
    srcs = {s["role"]: s for s in m["model"]["sources"]["sources"]}
    assert srcs["transformer"]["name"] == "z_image_turbo.safetensors" and srcs["transformer"]["layout"] == "zimage-original"
    assert srcs["vae"]["size"] == files["vae"].stat().st_size and len(srcs["text_encoder"]["sha256"]) == 64
    _same_images(out, tiny_fp32)
    # a rebuild from the unchanged files reuses everything
    logs = []
    build.build(str(files["dit"]), target="cpu", precision="fp32", out=out, parity=False, log=logs.append,
                text_encoder=str(files["te"]), vae=str(files["vae"]))
    assert sum("up to date" in line for line in logs) == 5, logs


def test_base_from_file_and_folder(files, base_ckpt, base_fp32, tmp_path):
    dit = write_dit(base_ckpt, tmp_path / "z_image_base.safetensors", prefix="", dtype=torch.float32)
    out = tmp_path / "b"
    m = _build(["--model", str(dit), "--base", str(base_ckpt), "--variant", "base"], out)
    assert m["variant"] == "base"
    _same_images(out, base_fp32, guidance_scale=3.0)


def test_edit_fine_tune_over_folder(edit_ckpt, edit_fp32, tmp_path):
    dit = write_dit(edit_ckpt, tmp_path / "edit.safetensors", prefix="diffusion_model.", dtype=torch.float32)
    out = tmp_path / "b"
    m = _build(["--model", str(edit_ckpt), "--transformer", str(dit)], out)
    assert m["variant"] == "edit"
    _same_images(out, edit_fp32, images=[synthetic_image(96, 80)], guidance_scale=3.0)
