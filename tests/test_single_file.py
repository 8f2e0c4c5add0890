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


def test_turbo_from_files(files, tiny_fp32, base_ckpt, tmp_path):
    out = tmp_path / "b"
    m = _build(["--model", str(files["dit"]), "--text-encoder", str(files["te"]), "--vae", str(files["vae"]),
                "--lean", "on"], out)  # the memory-lean path streams the file's tensors into the graphs
    assert m["variant"] == "turbo" and m["export"]["lean"]
    srcs = {s["role"]: s for s in m["model"]["sources"]["sources"]}
    assert srcs["transformer"]["name"] == "z_image_turbo.safetensors" and srcs["transformer"]["layout"] == "zimage-original"
    assert srcs["vae"]["size"] == files["vae"].stat().st_size and len(srcs["text_encoder"]["sha256"]) == 64
    _same_images(out, tiny_fp32)
    # a rebuild from the unchanged files reuses everything
    logs = []
    build.build(str(files["dit"]), target="cpu", precision="fp32", out=out, parity=False, log=logs.append,
                text_encoder=str(files["te"]), vae=str(files["vae"]))
    assert sum("up to date" in line for line in logs) == 5, logs
    # a fine-tune (another DiT file, same text encoder and VAE): only the DiT's graphs are exported again
    tuned = write_dit(base_ckpt, tmp_path / "tuned.safetensors", dtype=torch.float32)
    logs.clear()
    build.build(str(tuned), target="cpu", precision="fp32", out=out, parity=False, log=logs.append,
                text_encoder=str(files["te"]), vae=str(files["vae"]))
    kept = sorted(line.split(":")[0] for line in logs if "up to date" in line)
    assert kept == ["[export] text_encoder", "[export] vae_decoder", "[export] vae_encoder"], logs


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


def _foreign(path, keys):
    save_file({k: torch.zeros(4, 4) for k in keys}, str(path))
    return path


BAD_DIT = {  # file -> what the error must say it found
    "flux": (["double_blocks.0.img_attn.qkv.weight", "single_blocks.0.linear1.weight"], "a Flux transformer"),
    "sdxl": (["model.diffusion_model.input_blocks.0.0.weight", "conditioner.embedders.0.x"], "an SD / SDXL UNet"),
    "qwen_image": (["img_in.weight", "transformer_blocks.0.img_mod.1.weight"], "a Qwen-Image transformer"),
    "lora": (["diffusion_model.layers.0.attention.qkv.lora_A.weight"], "a LoRA"),
}


def _refused(argv, out, capsys, *found):
    from zimage_deploy.cli import run_cli

    views = Path(__import__("os").environ["ZIMAGE_DEPLOY_CACHE"]) / "views"
    before = sorted(views.iterdir()) if views.is_dir() else []
    assert run_cli(lambda: build.main([*argv, "--target", "cpu", "--out", str(out)])) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    for text in found:
        assert text in err[0], err[0]
    assert not out.exists() and (sorted(views.iterdir()) if views.is_dir() else []) == before
    return err[0]


@pytest.mark.parametrize("kind", sorted(BAD_DIT))
def test_other_models_refused(kind, files, tmp_path, capsys):
    keys, found = BAD_DIT[kind]
    f = _foreign(tmp_path / f"{kind}.safetensors", keys)
    _refused(["--model", str(f), "--text-encoder", str(files["te"]), "--vae", str(files["vae"])], tmp_path / "o",
             capsys, found, "expected a Z-Image transformer")


def test_bad_files_refused(files, edit_ckpt, tmp_path, capsys):
    te, vae, dit = str(files["te"]), str(files["vae"]), str(files["dit"])
    out = tmp_path / "o"
    data = files["dit"].read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) // 2])
    _refused(["--model", str(tmp_path / "cut.safetensors"), "--text-encoder", te, "--vae", vae], out, capsys,
             "truncated")
    (tmp_path / "model.ckpt").write_bytes(b"\x80\x04\x95" + bytes(64))
    _refused(["--model", str(tmp_path / "model.ckpt"), "--base", "tiny"], out, capsys, "pickle")
    _refused(["--model", dit, "--text-encoder", te, "--vae", te], out, capsys, "--vae", "found a Qwen3 text encoder",
             "expected the Flux autoencoder")
    _refused(["--model", dit, "--text-encoder", te], out, capsys, "--vae FILE")
    _refused(["--model", dit], out, capsys, "--base DIR")
    _refused(["--model", str(edit_ckpt), "--vae", vae], out, capsys, "go with a transformer file")
    _refused(["--model", dit, "--transformer", dit, "--base", "tiny"], out, capsys, "replaces the DiT of --model DIR")
    state = load_file(dit)
    state["model.diffusion_model.layers.1.feed_forward.w2.weight"] = torch.zeros(64, 100)
    save_file(state, str(tmp_path / "wrong.safetensors"))
    _refused(["--model", str(tmp_path / "wrong.safetensors"), "--text-encoder", te, "--vae", vae], out, capsys,
             "layers.1.feed_forward.w2.weight [64, 100]")
    edit_dit = write_dit(edit_ckpt, tmp_path / "edit.safetensors")
    _refused(["--model", str(edit_dit), "--base", "tiny"], out, capsys, "Edit/Omni transformer", "turbo")
    _refused(["--model", str(edit_dit), "--text-encoder", te, "--vae", vae], out, capsys, "--base DIR")


def test_fp8_files_dequantized(files, tiny_ckpt, tiny_fp32, tmp_path):
    """Plain FP8 weights are upcast exactly, scaled ones become fp8 * scale; a build from a scaled file stays within
    the FP8 quality gate's PSNR of the folder build."""
    from zimage_deploy.checkpoint import iter_tensors
    from zimage_deploy.quantize.options import QuantOptions
    from zimage_deploy.singlefile import prepare

    for kind in ("plain", "scaled"):
        dit = write_dit(tiny_ckpt, tmp_path / f"z_image_fp8_{kind}.safetensors", fp8=kind)
        stored = load_file(str(dit))
        view, _ = prepare(str(dit), text_encoder=str(files["te"]), vae=str(files["vae"]), log=lambda *a: None)
        got = dict(iter_tensors(view / "transformer"))
        q = stored["model.diffusion_model.layers.0.feed_forward.w2.weight"]
        assert q.dtype == torch.float8_e4m3fn
        scale = stored.get("model.diffusion_model.layers.0.feed_forward.w2.scale_weight", torch.tensor(1.0))
        assert torch.equal(got["layers.0.feed_forward.w2.weight"].float(), q.float() * scale)
        assert not any(k.endswith(("scale_weight", "scaled_fp8")) for k in got)
    out = tmp_path / "b"
    m = _build(["--model", str(dit), "--text-encoder", str(files["te"]), "--vae", str(files["vae"])], out)
    assert {s["role"]: s["fp8"] for s in m["model"]["sources"]["sources"]}["transformer"] == "scaled"
    a, b = _image(out, "onnxruntime"), _image(tiny_fp32, "onnxruntime")
    psnr = 10 * np.log10(255.0**2 / np.mean((a - b) ** 2))
    assert QuantOptions.min_psnr <= psnr < 60, psnr  # close, but not the unquantized weights


def test_fp8_reuse_measured(files, tiny_ckpt, tmp_path):
    """--precision fp8 from an FP8 file: per layer, the file's own grid against re-quantizing (max |W|); a plain
    FP8 file's layers are reproduced exactly by its own grid (scale 1), which re-quantizing cannot do."""
    from zimage_deploy.models.stream import dit_weights
    from zimage_deploy.numerics import tensor_amax
    from zimage_deploy.quantize.reuse import choose, file_scales
    from zimage_deploy.singlefile import prepare

    dit = write_dit(tiny_ckpt, tmp_path / "z_image_fp8.safetensors", fp8="plain")
    view, _ = prepare(str(dit), text_encoder=str(files["te"]), vae=str(files["vae"]), log=lambda *a: None)
    table = file_scales(view)
    assert table["layers.0.attention.qkv"] == [1.0] * 3 and table["layers.0.feed_forward.w13"] == [1.0, 1.0]
    scales = {f"{n[:-len('.weight')]}.weight_amax": tensor_amax(w) for n, w in dit_weights(view)
              if n[:-len(".weight")] in table}
    record = choose(scales, view)
    assert record["layers_reusing_file_fp8"] == len(table) and record["layers_requantized"] == 0
    assert record["mean_rel_err_chosen"] == 0 < record["mean_rel_err_if_requantized"]
    assert float(scales["layers.0.attention.qkv.weight_amax"]) == 448.0
    assert choose(scales, tiny_ckpt) is None  # a diffusers folder: nothing to reuse


def test_streamed_writer(tiny_ckpt, tmp_path):
    """The real-size measurement's file writer (header first, then tensor by tensor) makes a valid safetensors file
    of the original layout, with distinct tensors."""
    from zimage_deploy.tiny import TINY_DIT
    from zimage_deploy.tiny_files import write_random_original_dit

    path = tmp_path / "streamed.safetensors"
    assert write_random_original_dit(path, {**TINY_DIT, "cap_feat_dim": 32}) == path.stat().st_size
    got, ref = load_file(str(path)), load_file(str(write_dit(tiny_ckpt, tmp_path / "ref.safetensors")))
    assert {k: v.shape for k, v in got.items()} == {k: v.shape for k, v in ref.items()}
    assert not torch.equal(got["model.diffusion_model.layers.0.feed_forward.w1.weight"],
                           got["model.diffusion_model.layers.0.feed_forward.w3.weight"])
